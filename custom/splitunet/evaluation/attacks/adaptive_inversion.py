"""White-box inversion that models the defense the filter trail describes (the adaptive attacker)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from splitunet.evaluation.attacks.base import check_non_negative
from splitunet.evaluation.attacks.defense_model import (
    PRECISION_BITS,
    DefenseModel,
    observed_keep_mask,
    quantization_bounds,
)
from splitunet.evaluation.attacks.white_box_inversion import WhiteBoxInversion

__all__ = ["AdaptiveWhiteBoxInversion", "noise_to_signal", "NOISE_TV_GAIN", "BIN_CENTRE_WEIGHT"]

# TV weight under noise: base * (1 + gain * noise-to-signal amplitude ratio of the observed level), the gain per
# start. Measured on the 32^3 FLAIR phantom crop, x0, 60 steps, base 0.1, ClippedGaussianNoise(clip_rms=1) with
# multipliers 2e-3, 4e-3, 8e-3 (noise std 1.0, 2.0, 4.1 against a signal RMS of 0.71): from noise the best TV
# weight was about 1.0, 1.7 and 3.2 (SSIM 0.74, 0.54, 0.30 against 0.66, 0.42, 0.20 at the base), i.e. close to
# base * (1 + 6 * ratio); from the prior the best stayed at 0.1-0.3 at every level (SSIM 0.78, 0.60, 0.43; larger
# weights flatten the prior's own edges), so the prior start keeps the base weight.
NOISE_TV_GAIN = {"noise": 6.0, "prior": 0.0}
# Weight of the squared distance to the received value inside the bin, per bit depth (the bin-aware term alone is
# zero inside the bin). Measured as above: int1 from the prior SSIM 0.61 at 0.1 (0.52 plain, 0.56 at 0), int2 0.88
# at 1.0 (0.88 plain, 0.82 at 0.1): at two bits and more the bins are narrow enough that the centre is the better
# guess, and the bin-aware term adds nothing.
BIN_CENTRE_WEIGHT = {1: 0.1}
BIN_CENTRE_WEIGHT_DEFAULT = 1.0


def noise_to_signal(observed: torch.Tensor, noise_std: float) -> float:
    """Noise std over signal RMS of a noised level, estimated from the observation alone.

    Independent noise adds ``std**2`` to the mean square, so the signal's mean square is the observed one minus
    that, floored at 1 % of the observed one where noise swamps the estimate (relative only: gradients have mean
    squares near 1e-12). 0 without noise; infinite for an all-zero observation with noise.
    """
    if noise_std <= 0:
        return 0.0
    observed_power = float(observed.double().pow(2).mean())
    signal = max(observed_power - noise_std**2, 0.01 * observed_power)
    return noise_std / signal**0.5 if signal > 0 else float("inf")


class AdaptiveWhiteBoxInversion(WhiteBoxInversion):
    """:class:`WhiteBoxInversion` whose feature term and prior weight follow the defense's public settings.

    Per observed level, the encoder's prediction goes through the deterministic part of the defense chain before
    it is compared, and only what carries information is compared:

    - channel (or element) dropout: only the kept channels (non-zero in the observation) are matched, and the
      prediction gets the filter's ``1 / (1 - rate)`` rescale;
    - top-k: only the kept (non-zero) entries are matched, plus optionally a hinge that every dropped entry was
      smaller in magnitude than the smallest kept one of its sample (``top_k_hinge``);
    - affine quantization: the loss is quadratic outside the received code's bin
      (:func:`~splitunet.evaluation.attacks.defense_model.quantization_bounds`), plus ``bin_centre_weight`` times
      the squared distance to the received value (measured per bit depth: :data:`BIN_CENTRE_WEIGHT`);
    - clipping and noise: the prediction is clipped to the known norm ``C`` like the features were, and the TV
      weight grows with the noise: ``tv_weight * (1 + noise_tv_gain * noise std / signal RMS)``
      (:func:`noise_to_signal`; measured rule per start, see :data:`NOISE_TV_GAIN`). Averaging repeated releases
      (:func:`~splitunet.evaluation.attacks.defense_model.average_releases`) lowers the std the model reports.

    Each level's term is normalised by the mean square of its compared observations, as
    :func:`~splitunet.evaluation.attacks.feature_matching_loss` does, so an undefended level gives the same loss.

    Args:
        features: the job's BasicUNet feature sizes.
        state_dict: the site encoder's state dict.
        defense: what the filter trail says (:func:`~splitunet.evaluation.attacks.defense_from_trail`).
        levels: levels to match (default: the finest observed).
        top_k_hinge: weight of the top-k magnitude hinge (0: off; measured to change SSIM by under 0.01).
        noise_tv_gain: growth of the TV weight with the noise-to-signal amplitude ratio (default: the measured
            :data:`NOISE_TV_GAIN` of the start, ``init``).
        bin_centre_weight: weight of the distance to the received value inside a quantization bin (default: the
            measured :data:`BIN_CENTRE_WEIGHT` of the bit depth).
        **kwargs: the other :class:`WhiteBoxInversion` settings (iterations, lr, tv_weight, init, seed, ...).
    """

    name = "adaptive_white_box_inversion"
    threat_model = "server knows the site encoder's weights and the defense's public settings (filter trail)"

    def __init__(
        self,
        features: Sequence[int],
        state_dict: Mapping[str, torch.Tensor],
        defense: DefenseModel,
        levels: Iterable[int] | None = None,
        top_k_hinge: float = 1.0,
        noise_tv_gain: float | None = None,
        bin_centre_weight: float | None = None,
        **kwargs,
    ):
        super().__init__(features, state_dict, levels=levels, **kwargs)
        if not isinstance(defense, DefenseModel):
            raise ValueError(f"defense must be a DefenseModel (defense_from_trail), got {type(defense).__name__}")
        self.defense = defense
        self.top_k_hinge = check_non_negative("top_k_hinge", top_k_hinge)
        gain = NOISE_TV_GAIN[self.init] if noise_tv_gain is None else noise_tv_gain
        self.noise_tv_gain = check_non_negative("noise_tv_gain", gain)
        self.bin_centre_weight = (
            None if bin_centre_weight is None else check_non_negative("bin_centre_weight", bin_centre_weight)
        )

    def tv_weight_for(self, targets: Mapping[int, torch.Tensor]) -> float:
        """The base TV weight raised by the noisiest matched level's noise-to-signal amplitude ratio."""
        ratios = [
            noise_to_signal(target, noise[1])
            for level, target in targets.items()
            if (noise := self.defense.noise(level)) is not None and noise[1] > 0
        ]
        return self.tv_weight * (1.0 + self.noise_tv_gain * max(ratios, default=0.0))

    def objective(self, targets: Mapping[int, torch.Tensor]) -> Callable[[dict[int, torch.Tensor]], torch.Tensor]:
        """Sum over levels of the defense-aware term (see the class docstring)."""
        terms = {level: self._level_term(level, target) for level, target in targets.items()}
        return lambda predicted: sum(term(predicted[level]) for level, term in terms.items())

    def _level_term(self, level: int, target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        defense = self.defense
        keep = observed_keep_mask(target, defense, level)
        keep = torch.ones_like(target, dtype=torch.bool) if keep is None else keep.expand_as(target)
        dropout = defense.dropout(level)
        scale = 1.0 / (1.0 - dropout[0]) if dropout else 1.0
        noise = defense.noise(level)
        precision = defense.precision(level)
        bounds = quantization_bounds(target, precision) if precision else None
        if bounds is not None:
            bits = PRECISION_BITS[precision]
            centre = self.bin_centre_weight
            centre = BIN_CENTRE_WEIGHT.get(bits, BIN_CENTRE_WEIGHT_DEFAULT) if centre is None else centre
        weight = keep.float()
        count = weight.sum().clamp_min(1.0)
        norm = (target.pow(2) * weight).sum().clamp_min(1e-12) / count
        hinge = None
        if defense.top_k(level) is not None and self.top_k_hinge > 0:
            # Every dropped entry was no larger than the smallest kept one of its sample (ties aside).
            kept_abs = torch.where(keep, target.abs(), torch.full_like(target, float("inf")))
            smallest = kept_abs.flatten(1).amin(dim=1).reshape(-1, *[1] * (target.dim() - 1))
            dropped = (~keep).float()
            hinge = (smallest, dropped, dropped.sum().clamp_min(1.0))

        def term(predicted: torch.Tensor) -> torch.Tensor:
            # The deterministic part of the chain, in the order the filters usually run (dropout, noise's clip).
            predicted = predicted * scale
            if noise is not None:
                norms = predicted.flatten(1).norm(dim=1).reshape(-1, *[1] * (predicted.dim() - 1))
                predicted = predicted * (noise[0] / (norms + 1e-12)).clamp(max=1.0)
            if bounds is None:
                squared = (predicted - target).pow(2)
            else:
                outside = F.relu(bounds[0] - predicted) + F.relu(predicted - bounds[1])
                squared = outside.pow(2) + centre * (predicted - target).pow(2)
            loss = (squared * weight).sum() / count / norm
            if hinge is not None:
                smallest, dropped, dropped_count = hinge
                excess = F.relu(predicted.abs() - smallest) * dropped
                loss = loss + self.top_k_hinge * excess.pow(2).sum() / dropped_count / norm
            return loss

        return term
