"""Privacy accounting of the Gaussian mechanism on released features, by Opacus' RDP accountant.

Opacus is an optional dependency (the ``dp`` extra): it is imported when an epsilon is first computed, so a site
whose policy runs no noise filter never needs it.
"""

from __future__ import annotations

import math
import warnings

__all__ = ["gaussian_epsilon", "effective_noise_multiplier"]

# Opacus' default RDP orders plus orders near 1, where the optimum lies for weak noise.
_ORDERS = [1.001, 1.003, 1.01, 1.03, 1.05, 1.07] + [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def effective_noise_multiplier(noise_multiplier: float, num_levels: int, sensitivity_factor: float = 2.0) -> float:
    """Noise multiplier of one release of ``num_levels`` clipped levels seen as one Gaussian mechanism.

    Each level of a sample is clipped to L2 norm C and gets N(0, (sigma * C)^2) noise. Replacing the sample by any
    other moves each level by at most ``sensitivity_factor * C`` (2C: the released value is the sample's own
    feature, not a sum), so the whole release has L2 sensitivity ``2C * sqrt(num_levels)``.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    return noise_multiplier / (sensitivity_factor * math.sqrt(num_levels))


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon after ``releases`` Gaussian releases with the given (effective) noise multiplier.

    Args:
        noise_multiplier: noise std divided by the L2 sensitivity of one release.
        releases: how many releases are composed.
        delta: the delta of (epsilon, delta)-DP.
        sample_rate: probability that a given sample is in one release; 1.0 (no amplification by sampling) is the
            worst case, valid whatever the batch sampling.

    Returns:
        epsilon (``inf`` for zero noise).
    """
    if noise_multiplier <= 0:
        return math.inf
    if releases < 1:
        return 0.0
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as error:
        raise ImportError(
            "the privacy accounting of ClippedGaussianNoise uses Opacus' RDP accountant, which is not installed "
            "here: pip install 'splitunet[dp]' (or opacus) on this party"
        ) from error
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(releases))]
    with warnings.catch_warnings():
        # Opacus warns when the best order is the smallest tried: the epsilon is then huge whatever the order.
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta, alphas=_ORDERS))
