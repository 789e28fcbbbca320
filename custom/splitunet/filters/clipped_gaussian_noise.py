"""Per-sample, per-level L2 clipping followed by Gaussian noise: the Gaussian mechanism on released features."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.filters.accounting import effective_noise_multiplier, gaussian_epsilon
from splitunet.filters.base import FeatureFilter
from splitunet.wire.protocol import level_index

__all__ = ["ClippedGaussianNoise", "clip_and_noise"]


def clip_and_noise(
    tensor: torch.Tensor, clip_norm: float, noise_multiplier: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each sample of a ``(B, ...)`` tensor to L2 norm ``clip_norm``, then add N(0, (sigma*C)^2) noise.

    Returns:
        ``(noisy tensor in the input dtype, per-sample norms before clipping)``.
    """
    values = tensor.detach().float()
    norms = values.reshape(values.shape[0], -1).norm(dim=1)
    factors = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
    clipped = values * factors.reshape(-1, *([1] * (values.dim() - 1)))
    if noise_multiplier > 0:
        noise = torch.randn(clipped.shape, generator=generator, device=clipped.device, dtype=clipped.dtype)
        clipped = clipped + noise * (noise_multiplier * clip_norm)
    return clipped.to(tensor.dtype), norms


class ClippedGaussianNoise(FeatureFilter):
    """Clip every sample's features per level to L2 norm ``clip_norm`` and add Gaussian noise of std
    ``noise_multiplier * clip_norm`` per element.

    On activations (a site's task results) this bounds what one released crop reveals about the site's image;
    on gradients (the server's task data) what it reveals about the labels. The filter reports per release the
    (epsilon, delta) of the Gaussian mechanism, and the epsilon composed over every release this filter has made
    (Opacus' RDP accountant). A release is one DXO; neighbouring data = one crop replaced by any other, so each
    level has L2 sensitivity 2C and a release of L levels sqrt(L) * 2C.

    The guarantee covers what is released, given the encoder: the encoder weights themselves are trained on the
    site's unnoised images, so the composed epsilon is not a formal DP bound on the whole training run (as in
    other split-learning DP work); it is a measure to compare settings, with leakage measured by the attacks.

    Args:
        clip_norm: L2 bound C of each sample's features at each level, or a bound per level key
            (``{"x0": 650, "x4": 40}``; the keys then choose the levels). Norms grow with the number of elements of
            a level (activations of the demo model have about 0.7 * sqrt(elements); gradients are orders of magnitude
            smaller), and each call logs the median norms per level to help choose C.
        noise_multiplier: sigma; noise std is ``sigma * C``.
        clip_rms: instead of ``clip_norm``: bound the root-mean-square value per element, i.e.
            ``C = clip_rms * sqrt(elements per sample)`` at each level; one setting then fits any crop size and
            feature width, which suits a site policy that must serve many jobs.
        delta: delta of the reported (epsilon, delta).
        sample_rate: probability that a given case is in one release, for the composed epsilon (1.0 = worst case,
            no amplification by sampling; e.g. batch_size / number of training cases under Poisson sampling).
        levels: skip levels to noise (default every level sent).
        data_kinds: feature kinds to act on (default activations and gradients).
        seed: noise seed, for tests only. Default: drawn from the OS, so that nobody can regenerate the noise.
        log_every: log one line every this many calls.
    """

    stateful = True  # its random generator and release count

    def __init__(
        self,
        clip_norm: float | Mapping[str, float] | None = None,
        noise_multiplier: float = 1.0,
        clip_rms: float | None = None,
        delta: float = 1e-5,
        sample_rate: float = 1.0,
        levels: Iterable[int] | None = None,
        data_kinds: Sequence[str] | None = None,
        seed: int | None = None,
        log_every: int = 1,
    ):
        if isinstance(clip_norm, Mapping):
            if levels is not None:
                raise SplitUNetConfigError("ClippedGaussianNoise: give levels or a clip_norm per level, not both")
            try:
                levels = [level_index(key) for key in clip_norm]
            except ValueError as error:
                raise SplitUNetConfigError(
                    f"ClippedGaussianNoise: clip_norm keys must be level keys: {error}"
                ) from None
        super().__init__(levels=levels, data_kinds=data_kinds, log_every=log_every)
        if (clip_norm is None) == (clip_rms is None):
            raise SplitUNetConfigError("ClippedGaussianNoise: give exactly one of clip_norm and clip_rms")
        bounds = clip_norm.values() if isinstance(clip_norm, Mapping) else [clip_norm if clip_rms is None else clip_rms]
        if not bounds or any(not isinstance(c, (int, float)) or not 0 < c < math.inf for c in bounds):
            raise SplitUNetConfigError(
                f"ClippedGaussianNoise: clip bounds must be finite numbers > 0, got {clip_norm or clip_rms}"
            )
        if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
            raise SplitUNetConfigError(
                f"ClippedGaussianNoise: noise_multiplier must be a finite number >= 0, got {noise_multiplier}"
            )
        if not 0 < delta < 1:
            raise SplitUNetConfigError(f"ClippedGaussianNoise: delta must be in (0, 1), got {delta}")
        if not 0 < sample_rate <= 1:
            raise SplitUNetConfigError(f"ClippedGaussianNoise: sample_rate must be in (0, 1], got {sample_rate}")
        if isinstance(clip_norm, Mapping):
            self.clip_norm = {k: float(v) for k, v in clip_norm.items()}
        else:
            self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.clip_rms = None if clip_rms is None else float(clip_rms)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.sample_rate = float(sample_rate)
        self.generator = torch.Generator()
        self.generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))

    def epsilon(self, num_levels: int, releases: int = 1) -> float:
        """Epsilon of ``releases`` releases of ``num_levels`` levels at this filter's settings."""
        sigma = effective_noise_multiplier(self.noise_multiplier, num_levels)
        return gaussian_epsilon(sigma, releases, self.delta, self.sample_rate if releases > 1 else 1.0)

    def bound(self, key: str, tensor: torch.Tensor) -> float:
        """The clip norm C of a level (``tensor``: that level's ``(B, ...)`` features)."""
        if self.clip_rms is not None:
            return self.clip_rms * math.sqrt(tensor[0].numel())
        return self.clip_norm[key] if isinstance(self.clip_norm, dict) else self.clip_norm

    def filter_features(self, features: dict[str, torch.Tensor], dxo: DXO, fl_ctx: FLContext):
        noisy, clipped_counts, medians, bounds = {}, [], [], {}
        for key, tensor in features.items():
            bound = bounds[key] = self.bound(key, tensor)
            noisy[key], norms = clip_and_noise(tensor, bound, self.noise_multiplier, self.generator)
            clipped_counts.append(int((norms > bound).sum()))
            medians.append(f"{key} {float(norms.median()):.3g}")
        releases = self.calls + 1
        epsilon_release = self.epsilon(len(features), 1)
        epsilon_total = self.epsilon(len(features), releases)
        noise_std = {key: self.noise_multiplier * bound for key, bound in bounds.items()}
        facts = {
            "clip_norm": bounds,
            "noise_std": noise_std,
            "levels": sorted(features),
            "epsilon_per_release": epsilon_release,
            "epsilon_composed": epsilon_total,
            "delta": self.delta,
            "releases": releases,
        }
        samples = sum(t.shape[0] for t in features.values())
        per_level = ", ".join(f"{key} C {bounds[key]:.3g} std {noise_std[key]:.3g}" for key in features)
        message = (
            f"clipped {sum(clipped_counts)}/{samples} sample-levels (median norms {', '.join(medians)}); noise: "
            f"{per_level}; (eps, delta) per release ({epsilon_release:.3g}, {self.delta:g}), composed over "
            f"{releases} releases eps {epsilon_total:.3g}"
        )
        return noisy, facts, message
