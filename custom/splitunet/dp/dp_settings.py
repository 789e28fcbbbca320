"""What a DP-SGD job asks of a hospital's training: noise, clipping, delta, accountant, sampling.

The settings are the job's ``"dp"`` entry, for example::

    "dp": {"target_epsilon": 8.0, "max_grad_norm": 1.0, "accountant": "rdp", "poisson_sampling": true}

Exactly one of ``noise_multiplier`` (sigma, given) and ``target_epsilon`` (sigma found so that the whole job ends at
that epsilon) is set. Everything is validated here, before any data is read, with a message naming the setting.
Importing this module loads neither torch nor Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from numbers import Real

from splitunet.errors import SplitUNetConfigError

__all__ = ["ACCOUNTANTS", "DEFAULT_DELTA", "DPSettings", "default_delta"]

# Opacus' accountants that the bundle offers: Renyi DP (Mironov 2017; Opacus' default) and the privacy random
# variable accountant (Gopi et al., NeurIPS 2021; tighter, slower).
ACCOUNTANTS = ("rdp", "prv")
# The delta the bundle uses unless a job or a site states one (also ClippedGaussianNoise's default).
DEFAULT_DELTA = 1e-5


def default_delta(num_cases: int) -> float:
    """The delta used when a job states none: ``min(1e-5, 1 / (10 N))`` for ``N`` training cases.

    A delta of ``1/N`` or more would allow a mechanism that publishes one whole patient's record, so the default stays
    well below it whatever the hospital's size.
    """
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 1:
        raise SplitUNetConfigError(f"the number of training cases must be an int >= 1, got {num_cases!r}")
    return min(DEFAULT_DELTA, 1.0 / (10 * num_cases))


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise SplitUNetConfigError(f"dp: {name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD settings of one job (Abadi et al., CCS 2016), validated on construction.

    Args:
        max_grad_norm: C, the L2 norm every per-sample gradient (all parameters together) is clipped to.
        noise_multiplier: sigma, the Gaussian noise's std divided by C; exclusive with ``target_epsilon``.
        target_epsilon: the epsilon the whole job may spend; sigma is then chosen by Opacus for the job's steps.
        delta: the delta of (epsilon, delta); ``None``: :func:`default_delta` of the hospital's training cases.
        accountant: ``"rdp"`` or ``"prv"`` (see :data:`ACCOUNTANTS`).
        poisson_sampling: draw each batch by including every training case independently with probability q
            (what the accountant assumes); ``False`` draws shuffled batches of fixed size, for which the reported
            epsilon is an approximation, not a guarantee. The split topologies, whose batches the server chooses or
            knows, need ``False``: every case of a batch contributes once and q is 1, no amplification (docs/dp.md).

    Raises:
        SplitUNetConfigError: a missing, extra or malformed setting (the message names it).
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str = "rdp"
    poisson_sampling: bool = True

    def __post_init__(self):
        _positive("max_grad_norm", self.max_grad_norm)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise SplitUNetConfigError(
                "dp: set exactly one of noise_multiplier (sigma) and target_epsilon, got "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}"
            )
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
        if self.delta is not None:
            delta = _positive("delta", self.delta)
            if delta >= 1:
                raise SplitUNetConfigError(f"dp: delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise SplitUNetConfigError(f"dp: accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if not isinstance(self.poisson_sampling, bool):
            raise SplitUNetConfigError(f"dp: poisson_sampling must be true or false, got {self.poisson_sampling!r}")

    @classmethod
    def from_config(cls, config: Mapping | None) -> DPSettings | None:
        """The settings from a job's ``"dp"`` entry; ``None`` (no entry) means the job trains without DP.

        Raises:
            SplitUNetConfigError: not a mapping, an unknown key, or a bad value (the message names it).
        """
        if config is None:
            return None
        if isinstance(config, DPSettings):
            return config
        if not isinstance(config, Mapping):
            raise SplitUNetConfigError(f"dp must be a mapping of DP-SGD settings or null, got {config!r}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SplitUNetConfigError(f"dp: unknown setting(s) {unknown}; expected some of {sorted(known)}")
        return cls(**config)

    def resolve_delta(self, num_cases: int) -> float:
        """The delta this job reports at, for a hospital of ``num_cases`` training cases.

        Raises:
            SplitUNetConfigError: a stated delta of ``1/N`` or more (it could expose a whole patient).
        """
        if self.delta is None:
            return default_delta(num_cases)
        if self.delta >= 1.0 / num_cases:
            raise SplitUNetConfigError(
                f"dp: delta {self.delta:g} is not below 1/N = {1.0 / num_cases:g} for this hospital's {num_cases} "
                "training cases; a delta that large could expose a whole patient's record"
            )
        return float(self.delta)

    def as_dict(self) -> dict:
        """The settings as the job wrote them (JSON-serializable)."""
        return asdict(self)
