"""White-box input inversion: the server knows the site encoder's weights (the upper bound of leakage)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from splitunet.evaluation.attacks.base import (
    Attack,
    check_levels,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from splitunet.evaluation.attacks.encoder_access import EncoderPrefix, build_encoder, input_channels
from splitunet.evaluation.attacks.objectives import feature_matching_loss, total_variation_3d
from splitunet.evaluation.attacks.observed import check_observed, resolve_crop_size

__all__ = ["WhiteBoxInversion", "INIT_CHOICES"]

# Where an inversion starts: seeded small noise, or the attacker's prior image (plus that noise).
INIT_CHOICES = ("noise", "prior")


class WhiteBoxInversion(Attack):
    """Optimise an input crop until the known encoder's features match the observed ones, under a TV prior.

    Minimises ``feature_matching_loss(E(x), observed) + tv_weight * TV(x)`` over the crop ``x`` with Adam, for a
    fixed number of iterations from seeded small noise. He, Zhang and Lee, "Model inversion attacks against
    collaborative inference", ACSAC 2019 (white-box rMLE); Mahendran and Vedaldi, CVPR 2015 (TV prior). This is
    the threat model in which Roth et al. (Split-U-Net, DeCaF@MICCAI 2022) measured the leakage of skip levels.

    The encoder's instance normalisation makes its features (nearly) blind to a positive affine change of the
    input's intensities, so the reconstruction's scale and offset are arbitrary: compare it with
    :func:`splitunet.evaluation.metrics.align_intensity` (the image metrics do).

    Defaults are short, for tests. Measured on a 32^3 FLAIR phantom crop (fresh encoder, features 8..128): x0
    reaches SSIM 0.90 in 60 iterations (mean image 0.26); x1 alone 0.58 with ``tv_weight=1`` (0.66 after 100).
    For real use raise ``iterations`` to 500-2000; x1 and deeper need the stronger prior (``tv_weight`` about 1).

    At iteration 1 the site's encoder is its seeded initialisation (``SiteTrainer.build``), which
    :func:`~splitunet.evaluation.attacks.build_encoder` reproduces exactly from
    ``config.seed + 1 + MODALITIES.index(modality)``;
    later captures need the site's checkpoint of that iteration.

    Args:
        features: the job's BasicUNet feature sizes, e.g. ``(8, 16, 32, 64, 128)``.
        state_dict: the site encoder's state dict (``SiteEncoder.state_dict()``; a site checkpoint holds it
            under ``"encoder"``). Its first convolution sets the input channels: 1 for a modality site, 4 for a
            :class:`SiteEncoder` carrying the U-shape's head (the reconstruction then has 4 channels).
        levels: levels to match. Default: the finest level observed. Adding coarser levels to x0 made the
            reconstruction worse in a 60-iteration trial (x0 alone SSIM 0.91, x0..x4 together 0.22: their loss
            dominates and is far harder to fit).
        iterations: Adam steps.
        lr: Adam learning rate.
        tv_weight: weight of the total-variation prior.
        init_std: std of the Gaussian noise the crop starts from.
        seed: seed of the starting noise.
        device: where to optimise.
        init: where the crop starts: ``"noise"`` (seeded small noise, the default) or ``"prior"`` (the ``prior``
            given to :meth:`reconstruct`, e.g. the mean auxiliary image at the same place, plus that noise).
    """

    name = "white_box_inversion"
    threat_model = "server knows the site encoder's weights (upper bound of input leakage)"

    def __init__(
        self,
        features: Sequence[int],
        state_dict: Mapping[str, torch.Tensor],
        levels: Iterable[int] | None = None,
        iterations: int = 100,
        lr: float = 0.1,
        tv_weight: float = 0.1,
        init_std: float = 0.1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        init: str = "noise",
    ):
        if state_dict is None:
            raise ValueError("WhiteBoxInversion needs the site encoder's state_dict (use UnSplit without it)")
        self.device = torch.device(device)
        self.encoder = build_encoder(features, state_dict).to(self.device).eval()
        # Only the input is optimised: parameter gradients would cost about twice the step for nothing.
        self.encoder.requires_grad_(False)
        self.features = self.encoder.features
        self.levels = check_levels(levels)
        self.iterations = check_positive_int("iterations", iterations)
        self.lr = check_positive("lr", lr)
        self.tv_weight = check_non_negative("tv_weight", tv_weight)
        self.init_std = check_positive("init_std", init_std)
        self.seed = int(seed)
        if init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
        self.init = init

    def _levels_for(self, observed: Mapping[int, torch.Tensor]) -> tuple[int, ...]:
        if self.levels is None:
            return (min(observed),)
        missing = sorted(set(self.levels) - set(observed))
        if missing:
            raise ValueError(f"levels {missing} were asked for but not observed (observed: {sorted(observed)})")
        return self.levels

    def reconstruct(
        self,
        observed: Mapping[int | str, torch.Tensor],
        crop_size: Sequence[int] | None = None,
        prior: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Invert the observed features.

        Args:
            observed: level -> ``(B, features[level], ...)`` as the server received them.
            crop_size: crop size ``(D, H, W)``; inferred from the finest level when omitted.
            prior: ``(1 or B, C, D, H, W)`` image to start from (``C``: the encoder's input channels); needed (and
                only used) with ``init="prior"``.

        Returns:
            ``(reconstruction (B, C, D, H, W), stats)``; stats: levels, iterations, first and last feature loss,
            last TV value, TV weight, start, seconds.
        """
        start = time.perf_counter()
        observed = check_observed(observed)
        size = resolve_crop_size(observed, crop_size)
        levels = self._levels_for(observed)
        targets = {level: observed[level].to(self.device) for level in levels}
        for level, target in targets.items():
            if target.shape[1] != self.features[level]:
                raise ValueError(
                    f"level x{level} has {target.shape[1]} channels, the encoder makes {self.features[level]}"
                )
        prefix = EncoderPrefix(self.encoder, levels)
        batch = next(iter(targets.values())).shape[0]
        x = self._start(batch, size, prior).requires_grad_(True)
        objective = self.objective(targets)
        tv_weight = self.tv_weight_for(targets)
        optimizer = torch.optim.Adam([x], lr=self.lr)
        first = None
        for _ in range(self.iterations):
            optimizer.zero_grad(set_to_none=True)
            match = objective(prefix(x))
            tv = total_variation_3d(x)
            (match + tv_weight * tv).backward()
            optimizer.step()
            first = float(match.detach()) if first is None else first
        stats = {
            "attack": self.name,
            "levels": list(levels),
            "iterations": self.iterations,
            "init": self.init,
            "tv_weight": tv_weight,
            "feature_loss_first": first,
            "feature_loss_last": float(match.detach()),
            "tv_last": float(tv.detach()),
            "seconds": time.perf_counter() - start,
        }
        return x.detach().cpu(), stats

    def _start(self, batch: int, size: Sequence[int], prior: torch.Tensor | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        channels = input_channels(self.encoder)
        x = self.init_std * torch.randn((batch, channels, *size), generator=generator)
        if self.init == "prior":
            if prior is None:
                raise ValueError("init='prior' needs the prior image: reconstruct(..., prior=...)")
            prior = prior.detach().float().cpu()
            if prior.dim() != 5 or prior.shape[1] != channels or tuple(prior.shape[2:]) != tuple(size):
                raise ValueError(
                    f"prior must be (1 or B, {channels}, {', '.join(map(str, size))}), got {tuple(prior.shape)}"
                )
            x = x + prior.expand(batch, -1, -1, -1, -1)
        return x.to(self.device)

    def objective(self, targets: Mapping[int, torch.Tensor]) -> Callable[[dict[int, torch.Tensor]], torch.Tensor]:
        """The feature term: predicted level features -> scalar. Subclasses that model a defense override it."""
        return lambda predicted: feature_matching_loss(predicted, targets)

    def tv_weight_for(self, targets: Mapping[int, torch.Tensor]) -> float:
        """The TV weight used on these targets (the fixed ``tv_weight`` here)."""
        return self.tv_weight
