"""Label inference by a curious site from the gradients the server returns for its own features."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from splitunet.evaluation.attacks.adaptive_inversion import noise_to_signal
from splitunet.evaluation.attacks.base import Attack, check_positive_int
from splitunet.evaluation.attacks.observed import check_observed, resolve_crop_size
from splitunet.wire.protocol import NUM_LEVELS

__all__ = [
    "GradientLabelInference",
    "otsu_threshold",
    "LABEL_METHODS",
    "adaptive_label_inference",
    "label_smoothing_sigma",
    "LABEL_QUANTILES",
]

LABEL_METHODS = ("norm", "direction")


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a set of values: the cut between histogram bins that maximises the between-class variance.

    Otsu, "A threshold selection method from gray-level histograms", IEEE TSMC 1979.

    Args:
        values: any shape, at least two distinct values expected (a constant input returns that value).
        bins: histogram bins between the minimum and maximum.
    """
    values = values.detach().flatten().float()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    histogram = torch.histc(values, bins=bins, min=low, max=high)
    p = histogram / histogram.sum()
    edges = torch.linspace(low, high, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = torch.cumsum(p, 0)
    mass_low = torch.cumsum(p * centres, 0)
    between = (mass_low[-1] * weight_low - mass_low) ** 2 / (weight_low * (1 - weight_low)).clamp_min(1e-12)
    # Cut at the upper edge of the best bin: values above it form the upper class.
    return float(edges[int(between[:-1].argmax()) + 1])


class GradientLabelInference(Attack):
    """Infer the server's tumour mask from the per-voxel gradients a site receives for its features.

    With the job's Dice + binary cross-entropy on sigmoid outputs, the gradient at logit ``z_v`` is ``(p_v - y_v) / N``
    from the cross-entropy plus a Dice term; at a fresh decoder (``p`` about 0.5 everywhere) the Dice term's magnitude
    is about ``N / |y|`` times larger inside the region than outside, and both terms change sign with the label. The
    decoder's last layers only smooth and mix these maps on their way to x0, so the gradient of x0 outlines the tumour.
    Two scores per voxel, each thresholded per sample:

    - ``"norm"``: the L2 norm of the gradient over channels (high = tumour); the gradient-norm attack of
      Li et al., "Label leakage and protection in two-party split learning", ICLR 2022.
    - ``"direction"``: the projection of the (centred) gradient vectors on their first principal direction;
      the minority side is taken as tumour (tumours fill a minority of a crop); the cosine/direction attack of
      Li et al. (ibid.), also used by UnSplit's label inference (Erdogan et al., WPES 2022).

    A coarser level's score map is upsampled (trilinear) to the crop size. The threshold is Otsu's (default) or
    a fixed quantile of the score, e.g. 0.95 marks the top 5 % of voxels.

    Against gradient noise the attacker adapts: with ``smoothing_sigma`` the ``"norm"`` score is the squared
    gradient norm averaged by a Gaussian (MONAI ``GaussianFilter``, sigma in voxels of the level) before
    thresholding. Independent noise adds about the same to every voxel's squared norm, while the tumour's larger
    gradients are spatially coherent, so averaging keeps the outline and removes most of the noise's spread.

    Args:
        level: the gradient level to use (default: the finest received).
        method: ``"norm"`` or ``"direction"``.
        threshold: ``"otsu"`` or a quantile in (0, 1).
        bins: histogram bins of Otsu's method.
        smoothing_sigma: Gaussian smoothing of the squared norm, in voxels (0: none; ``"norm"`` only).
    """

    name = "gradient_label_inference"
    threat_model = "a site reads the gradients of its own features (labels stay at the server)"

    def __init__(
        self,
        level: int | None = None,
        method: str = "norm",
        threshold: str | float = "otsu",
        bins: int = 256,
        smoothing_sigma: float = 0.0,
    ):
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < NUM_LEVELS):
            raise ValueError(f"level must be None or an int in 0..{NUM_LEVELS - 1}, got {level!r}")
        if method not in LABEL_METHODS:
            raise ValueError(f"method must be one of {LABEL_METHODS}, got {method!r}")
        if threshold != "otsu" and not (
            isinstance(threshold, float) and not isinstance(threshold, bool) and 0 < threshold < 1
        ):
            raise ValueError(f"threshold must be 'otsu' or a quantile float in (0, 1), got {threshold!r}")
        self.level = level
        self.method = method
        self.threshold = threshold
        self.bins = check_positive_int("bins", bins)
        if isinstance(smoothing_sigma, bool) or not isinstance(smoothing_sigma, (int, float)) or smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be a number of voxels >= 0, got {smoothing_sigma!r}")
        if smoothing_sigma and method != "norm":
            raise ValueError("smoothing_sigma applies to the 'norm' method only")
        self.smoothing_sigma = float(smoothing_sigma)

    def score_map(
        self, observed: Mapping[int | str, torch.Tensor], crop_size: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, int]:
        """Per-voxel tumour score at crop resolution.

        Args:
            observed: level -> gradient ``(B, C, D, H, W)`` as the site received it.
            crop_size: crop size ``(D, H, W)``; inferred from the finest level when omitted.

        Returns:
            ``(score (B, 1, D, H, W), level used)``; for ``"direction"`` the sign is set so that high = tumour.
        """
        observed = check_observed(observed, what="observed gradients")
        size = resolve_crop_size(observed, crop_size)
        level = min(observed) if self.level is None else self.level
        if level not in observed:
            raise ValueError(f"gradient level x{level} was not received (received: {sorted(observed)})")
        grad = observed[level]
        if self.method == "norm" and self.smoothing_sigma:
            squared = grad.float().pow(2).sum(dim=1, keepdim=True)
            score = GaussianFilter(spatial_dims=3, sigma=self.smoothing_sigma)(squared)
        elif self.method == "norm":
            score = grad.norm(dim=1, keepdim=True)
        else:
            score = torch.stack([self._principal_projection(sample) for sample in grad])
        if tuple(score.shape[2:]) != size:
            score = F.interpolate(score, size=size, mode="trilinear", align_corners=False)
        return score, level

    def _principal_projection(self, grad: torch.Tensor) -> torch.Tensor:
        """``(C, D, H, W)`` gradient -> ``(1, D, H, W)`` projection on the first principal direction, minority high."""
        vectors = grad.reshape(grad.shape[0], -1).T
        vectors = vectors - vectors.mean(0)
        # C x C covariance: C is small (the level's channels), so this is cheap and exact.
        _, eigenvectors = torch.linalg.eigh(vectors.T @ vectors)
        projection = vectors @ eigenvectors[:, -1]
        cut = otsu_threshold(projection, self.bins)
        if (projection > cut).float().mean() > 0.5:
            projection = -projection
        return projection.reshape(1, *grad.shape[1:])

    def reconstruct(
        self, observed: Mapping[int | str, torch.Tensor], crop_size: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Infer a binary tumour mask per sample.

        Returns:
            ``(mask (B, 1, D, H, W) float32 in {0, 1}, stats)``; stats: level, method, threshold per sample,
            fraction of voxels marked per sample, seconds.
        """
        start = time.perf_counter()
        score, level = self.score_map(observed, crop_size)
        masks, cuts = [], []
        for sample in score:
            if self.threshold == "otsu":
                cut = otsu_threshold(sample, self.bins)
            else:
                cut = float(torch.quantile(sample.flatten(), self.threshold))
            masks.append((sample > cut).float())
            cuts.append(cut)
        mask = torch.stack(masks)
        stats = {
            "attack": self.name,
            "level": level,
            "method": self.method,
            "threshold": self.threshold,
            "smoothing_sigma": self.smoothing_sigma,
            "cut": cuts,
            "fraction": [float(m.mean()) for m in mask],
            "seconds": time.perf_counter() - start,
        }
        return mask, stats


# Label smoothing rule: sigma = LABEL_SMOOTHING_BASE * (1 + ratio / LABEL_NOISE_SCALE), ratio = noise std over the
# gradient's signal RMS at the level. Measured on 8 first-iteration crops of 32^3 seen by the FLAIR site (the
# set-up of tests/evaluation/attacks/test_label_inference_adaptive.py), whole-tumour Dice, gradient noise
# multipliers 0, 1e-3, 5e-3, 2e-2 (ratio 0, 0.5, 2.4, 9.7): sigma 0.75 was best up to 5e-3 (Otsu 0.84, 0.84, 0.82;
# unsmoothed 0.75, 0.76, 0.19; sigma 1.5: 0.79, 0.79, 0.78) and 1.5 at 2e-2 (quantile 0.95: 0.56; sigma 0.75: 0.28,
# 3.0: 0.51, unsmoothed 0.08).
LABEL_SMOOTHING_BASE = 0.75
LABEL_NOISE_SCALE = 10.0
# Quantiles tried next to Otsu (whole tumours fill a few per cent of a crop: 4 % in that set-up).
LABEL_QUANTILES = (0.9, 0.95, 0.98)
# The attacker-side choice: Otsu on the smoothed map, unless it marks more than this share of the voxels (tumours
# fill a minority of a crop; under heavy noise Otsu splits the noise instead), then FALLBACK_QUANTILE.
OTSU_MAX_FRACTION = 0.2
FALLBACK_QUANTILE = 0.95


def label_smoothing_sigma(gradient: torch.Tensor, noise_std: float = 0.0) -> float:
    """Gaussian smoothing (voxels) of the squared gradient norm for a gradient level with known noise std.

    The rule ``LABEL_SMOOTHING_BASE * (1 + ratio / LABEL_NOISE_SCALE)`` with ratio = noise std / signal RMS
    (measured, see :data:`LABEL_SMOOTHING_BASE`; the ratio as :func:`~splitunet.evaluation.attacks.
    adaptive_inversion.noise_to_signal` estimates it from the observation).
    """
    if noise_std <= 0:
        return LABEL_SMOOTHING_BASE
    return LABEL_SMOOTHING_BASE * (1.0 + noise_to_signal(gradient, noise_std) / LABEL_NOISE_SCALE)


def adaptive_label_inference(
    gradients: Mapping[int | str, torch.Tensor],
    crop_size: Sequence[int] | None = None,
    noise_std: float = 0.0,
    quantiles: Sequence[float] = LABEL_QUANTILES,
    level: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The label attack adapted to the server's gradient defense: smoothed norm, several thresholds, one chosen.

    Smoothing follows the gradient noise the trail reports (:func:`label_smoothing_sigma`); every threshold (Otsu
    and each quantile) gives a candidate mask. The attacker cannot score them against the truth, so it commits to
    one by a rule that uses only what it sees: Otsu on the smoothed map, unless that marks more than
    :data:`OTSU_MAX_FRACTION` of a sample's voxels, then the :data:`FALLBACK_QUANTILE`. The best candidate by Dice
    is an oracle (an upper bound), for the report only.

    Args:
        gradients: level -> gradient ``(B, C, D, H, W)`` as the site received it.
        crop_size: crop size; inferred when omitted.
        noise_std: noise std per element the trail reports at the level used (0: no gradient noise).
        quantiles: quantiles tried next to Otsu.
        level: gradient level (default: the finest received).

    Returns:
        ``(candidates, stats)``: ``{"otsu": mask, "q0.95": mask, ...}`` and stats with ``smoothing_sigma``,
        ``chosen`` (a candidate's name, per sample if they differ: ``chosen_per_sample``) and the ``"chosen"``
        mask itself under ``candidates["chosen"]``.
    """
    start = time.perf_counter()
    checked = check_observed(gradients, what="observed gradients")
    used = min(checked) if level is None else level
    sigma = label_smoothing_sigma(checked[used], noise_std) if used in checked else LABEL_SMOOTHING_BASE
    candidates, fractions = {}, {}
    for threshold in ("otsu", *(float(q) for q in quantiles)):
        name = "otsu" if threshold == "otsu" else f"q{threshold:g}"
        attack = GradientLabelInference(level=used, threshold=threshold, smoothing_sigma=sigma)
        candidates[name], stats = attack.reconstruct(checked, crop_size)
        fractions[name] = stats["fraction"]
    fallback = f"q{FALLBACK_QUANTILE:g}"
    if fallback not in candidates:
        candidates[fallback], _ = GradientLabelInference(
            level=used, threshold=FALLBACK_QUANTILE, smoothing_sigma=sigma
        ).reconstruct(checked, crop_size)
    chosen = ["otsu" if f <= OTSU_MAX_FRACTION else fallback for f in fractions["otsu"]]
    candidates["chosen"] = torch.stack([candidates[name][i] for i, name in enumerate(chosen)])
    stats = {
        "attack": "adaptive_label_inference",
        "level": used,
        "smoothing_sigma": sigma,
        "noise_std": float(noise_std),
        "chosen": chosen[0] if len(set(chosen)) == 1 else "per sample",
        "chosen_per_sample": chosen,
        "fraction": fractions,
        "seconds": time.perf_counter() - start,
    }
    return candidates, stats
