"""Substitute-encoder attack: learn an encoder whose features look like the received ones, and its inverse.

FORA (Xu et al., "A Stealthy Wrongdoer: Feature-Oriented Reconstruction Attack against Split Learning", CVPR 2024)
and SDAR (Zhu et al., "Passive Inference Attacks on Split Learning via Adversarial Regularization", NDSS 2025):
the server does not know the site's weights, but it knows the architecture (the job config), holds auxiliary
scans of the modality (other patients) and has received the features of many crops over many iterations. It
trains its own encoder, from its own random initialisation, so that the features of the auxiliary crops follow
the *distribution* of the received features (FORA: MK-MMD and a discriminator; SDAR: adversarial
regularisation), and jointly trains an inverse decoder on (auxiliary crop, substitute features) pairs
(He et al., ACSAC 2019). The decoder then maps received features to images.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from splitunet.evaluation.attacks.base import (
    Attack,
    check_levels,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from splitunet.evaluation.attacks.encoder_access import EncoderPrefix, build_encoder
from splitunet.evaluation.attacks.learned_inverse import InverseDecoder, decode_levels
from splitunet.evaluation.attacks.observed import check_observed

__all__ = ["SubstituteEncoderAttack", "mk_mmd", "voxel_vectors"]

MATCHING = ("mmd", "discriminator", "none")
# Gaussian bandwidths relative to the median pairwise distance: the multi-kernel family of MK-MMD
# (Gretton et al., NeurIPS 2012), as FORA uses it.
_MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
# The substitute draws its weights from seed + this offset: far from the small seeds sites use (job seed + 1 +
# modality index, or a test's 0), so that a measurement cannot hit the site's own initialisation by chance
# (an early trial with seed 0 did, and "matched" trivially).
_SUBSTITUTE_SEED_OFFSET = 20_000


def voxel_vectors(features: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` feature vectors ``(count, C)`` drawn (with replacement) from the voxels of ``(B, C, D, H, W)``.

    A voxel's channel vector is the unit the distribution is matched on: it does not depend on the crop size or
    position, so features of crops of any size (received ones, auxiliary ones) are comparable.
    """
    flat = features.movedim(1, -1).reshape(-1, features.shape[1])
    index = torch.randint(len(flat), (count,), generator=generator).to(flat.device)
    return flat[index]


def mk_mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Biased squared MK-MMD between samples ``a (n, C)`` and ``b (m, C)``: a sum of Gaussian kernels whose
    bandwidths are multiples of the median distance between the two samples (detached, so it is not a target).

    Gretton et al., "A Kernel Two-Sample Test", JMLR 2012, and "Optimal kernel choice for large-scale two-sample
    tests", NeurIPS 2012 (multi-kernel); the feature-matching loss of FORA (Xu et al., CVPR 2024).
    """
    aa, bb, ab = torch.cdist(a, a).pow(2), torch.cdist(b, b).pow(2), torch.cdist(a, b).pow(2)
    bandwidth = ab.detach().median().clamp_min(1e-6)
    total = a.new_zeros(())
    for scale in _MMD_SCALES:
        gamma = 1.0 / (scale * bandwidth)
        total = total + (-gamma * aa).exp().mean() + (-gamma * bb).exp().mean() - 2 * (-gamma * ab).exp().mean()
    return total


class _Discriminator(nn.Module):
    """Patch discriminator on one level's features: two 3x3x3 convolutions and a 1x1x1 logit (PatchGAN-like,
    Isola et al., CVPR 2017), fully convolutional so that any crop size works."""

    def __init__(self, channels: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(channels, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _received_tensors(received, levels: Sequence[int]) -> dict[int, torch.Tensor]:
    """Concatenate received observations (a mapping, or a sequence of mappings: one per iteration) per level."""
    batches = [received] if isinstance(received, Mapping) else list(received)
    if not batches:
        raise ValueError("received must hold at least one observation")
    out = {}
    for level in levels:
        parts = []
        for batch in batches:
            batch = check_observed(batch)
            if level not in batch:
                raise ValueError(f"received observations lack level x{level} (they hold {sorted(batch)})")
            parts.append(batch[level].detach().float().cpu())
        out[level] = torch.cat(parts)
    return out


class SubstituteEncoderAttack(Attack):
    """Train a substitute encoder to the received features' distribution and an inverse decoder on it; decode.

    :meth:`fit` alternates, for ``steps`` steps on a batch of auxiliary crops:

    1. (``matching="discriminator"``) one step of a per-level patch discriminator telling received features
       (label 1) from substitute features of auxiliary crops (label 0);
    2. one step of the substitute encoder and the :class:`InverseDecoder` together on
       ``MSE(decoder(E'(aux)), aux) + match_weight * matching(E'(aux), received)``, where matching is the MK-MMD
       between voxel feature vectors (FORA) or the non-saturating GAN loss of the discriminator (FORA, SDAR).

    The reconstruction term also trains the substitute, as in SDAR, where the simulator and decoder are trained
    together: it keeps the substitute's features invertible while the matching term moves their distribution.

    **What was measured** (32^3 FLAIR phantom crop at x0, the tests' set-up; site encoder freshly initialised
    from seed 0, which the attacker does not know; 20 auxiliary crops of the other cases; received x0 features of
    8 crops of the site's case; batch 4; one torch thread on the busy 2-core machine; scratch scripts equivalent to
    ``python -m splitunet.evaluation.attacks.attack_measurements substitute``). Mean image SSIM 0.261.

    - White-box learned inverse (the site's own encoder, 150 steps): SSIM 0.754.
    - Learned inverse on a wrongly seeded encoder (what the old rows did with a private seed): 0.18 / 0.20.
    - ``matching="mmd"``: MMD to the received voxel vectors fell 0.35 -> 0.025 (seed 1), 0.26 -> 0.016
      (seed 2), 0.17 -> 0.009 (seed 0, ``match_weight=10``) in 150 steps, while ``"none"`` *raised* it to
      0.5 (the reconstruction loss alone moves the substitute away). Yet after 150 steps every substitute run
      (mmd with weight 1 or 10, none; seeds 0-2) scored SSIM 0.154: the decoded image did not correlate
      positively with the crop, so the metric's ``a >= 0`` intensity alignment made it a constant. After 80 steps
      (seed 1, ``match_weight=10``) the same attack reached SSIM 0.487 (correlation 0.83 with the crop) and
      ``"none"`` 0.305. **The attack can beat the prior but is unstable: longer training made it worse, and the
      attacker has no ground truth to stop at the right step.** Under ``ssim_reported`` (max with the prior) the
      150-step rows report the prior.
    - ``matching="discriminator"``: slower (about 0.5 s/step vs 0.2) and its MMD stayed high (0.32 after 150
      steps); measured only with the site's own seed, where it trailed mmd. MMD was kept as the default.

    Why distribution matching is weak here: the encoder's instance normalisation standardises every channel per
    crop, so the per-channel marginals of any encoder are nearly the same (two fresh encoders are already close in
    MMD); what differs is *which* input pattern drives which channel, a permutation / mixing of channels that a
    distribution of voxel vectors pins down only weakly (a channel permutation of a matching substitute matches
    equally well, but the decoder then reads the channels in the wrong roles). FORA and SDAR were evaluated on 2D
    images with thousands of received batches and thousands of steps; here a few crops. Not tried for lack of
    time: permutation-invariant statistics first (e.g. sorted eigenvalues of the channel covariance), SDAR's
    decoder-side adversarial term, early stopping on the decoder's output statistics. An attacker with the seed
    should use :class:`WhiteBoxInversion` and encoder tracking
    (:mod:`~splitunet.evaluation.attacks.encoder_tracking`).

    Args:
        features: the job's BasicUNet feature sizes.
        levels: levels the attacker matches and decodes (default: x0, the finest).
        matching: ``"mmd"`` (MK-MMD on voxel vectors), ``"discriminator"`` (patch GAN), or ``"none"`` (a decoder
            on the untrained substitute: the baseline that shows what matching adds).
        match_weight: weight of the matching term in the substitute's loss.
        width: hidden channels of the inverse decoder.
        steps: training steps of :meth:`fit`.
        batch_size: auxiliary crops (and received crops) per step.
        lr: Adam learning rate of the decoder (and the discriminator).
        lr_encoder: Adam learning rate of the substitute encoder.
        voxels: voxel vectors drawn per level and side for the MMD.
        seed: seed of the substitute's (offset by 20000) and decoder's initialisation and of the batch order.
        device: where to train.

    Attributes:
        substitute: the trained substitute :class:`~splitunet.networks.SiteEncoder`.
        decoder: the trained :class:`InverseDecoder`.
    """

    name = "substitute_encoder"
    threat_model = (
        "server knows the architecture, holds auxiliary crops of the modality and the received features of many "
        "crops; not the site's weights (FORA/SDAR)"
    )

    def __init__(
        self,
        features: Sequence[int],
        levels: Iterable[int] | None = (0,),
        matching: str = "mmd",
        match_weight: float = 1.0,
        width: int = 16,
        steps: int = 100,
        batch_size: int = 4,
        lr: float = 3e-3,
        lr_encoder: float = 1e-3,
        voxels: int = 512,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.features = tuple(int(f) for f in features)
        self.levels = check_levels(levels) or (0,)
        if matching not in MATCHING:
            raise ValueError(f"matching must be one of {MATCHING}, got {matching!r}")
        self.matching = matching
        self.match_weight = check_non_negative("match_weight", match_weight)
        self.steps = check_positive_int("steps", steps)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.lr = check_positive("lr", lr)
        self.lr_encoder = check_positive("lr_encoder", lr_encoder)
        self.voxels = check_positive_int("voxels", voxels)
        self.seed = int(seed)
        self.device = torch.device(device)
        # The attacker's own initialisation: a seed unrelated to the site's (which it does not know).
        self.substitute = build_encoder(self.features, seed=self.seed + _SUBSTITUTE_SEED_OFFSET).to(self.device)
        self.prefix = EncoderPrefix(self.substitute, self.levels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            self.decoder = InverseDecoder(self.substitute.features, self.levels, width).to(self.device)
            self.discriminators = nn.ModuleDict(
                {str(level): _Discriminator(self.substitute.features[level]) for level in self.levels}
            ).to(self.device)
        self.crop_size: tuple[int, int, int] | None = None

    @torch.no_grad()
    def distribution_distance(self, aux_crops: torch.Tensor, received, voxels: int = 2048, seed: int = 0) -> float:
        """MK-MMD between the substitute's voxel vectors on ``aux_crops`` and the received ones, summed over levels.

        The attacker can compute it (no ground truth), so it is also how to tell whether :meth:`fit` matched.
        """
        generator = torch.Generator().manual_seed(seed)
        targets = _received_tensors(received, self.levels)
        mine = self.prefix(aux_crops.detach().float().to(self.device))
        total = 0.0
        for level in self.levels:
            a = voxel_vectors(mine[level], voxels, generator)
            b = voxel_vectors(targets[level].to(self.device), voxels, generator)
            total += float(mk_mmd(a, b))
        return total

    def fit(self, aux_crops: torch.Tensor, received) -> dict:
        """Train the substitute and the decoder.

        Args:
            aux_crops: auxiliary crops ``(N, 1, D, H, W)`` of the modality, in the site's intensity normalisation.
            received: the received features: level -> ``(M, C, ...)``, or a sequence of such mappings (one per
                iteration / case); every level in :attr:`levels` must be present.

        Returns:
            stats: steps, matching, the MMD to the received features before and after, first and last
            reconstruction MSE, seconds.
        """
        start = time.perf_counter()
        if not isinstance(aux_crops, torch.Tensor) or aux_crops.dim() != 5 or aux_crops.shape[1] != 1:
            shape = tuple(aux_crops.shape) if isinstance(aux_crops, torch.Tensor) else type(aux_crops).__name__
            raise ValueError(f"aux_crops must be a (N, 1, D, H, W) tensor, got {shape}")
        aux_crops = aux_crops.detach().float()
        targets = _received_tensors(received, self.levels)
        for level, target in targets.items():
            if target.shape[1] != self.features[level]:
                raise ValueError(
                    f"received x{level} has {target.shape[1]} channels, the job's makes {self.features[level]}"
                )
        self.crop_size = tuple(int(s) for s in aux_crops.shape[2:])
        mmd_before = self.distribution_distance(aux_crops, targets)
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(
            [
                {"params": self.substitute.parameters(), "lr": self.lr_encoder},
                {"params": self.decoder.parameters(), "lr": self.lr},
            ]
        )
        disc_optimizer = torch.optim.Adam(self.discriminators.parameters(), lr=self.lr, betas=(0.5, 0.999))
        self.substitute.train()
        self.decoder.train()
        first = last = None
        match_value = 0.0
        for _ in range(self.steps):
            index = torch.randint(len(aux_crops), (min(self.batch_size, len(aux_crops)),), generator=generator)
            images = aux_crops[index].to(self.device)
            real = {}
            for level, target in targets.items():
                pick = torch.randint(len(target), (min(self.batch_size, len(target)),), generator=generator)
                real[level] = target[pick].to(self.device)
            mine = self.prefix(images)
            if self.matching == "discriminator":
                disc_optimizer.zero_grad(set_to_none=True)
                disc_loss = sum(
                    _bce(self.discriminators[str(level)](real[level]), 1.0)
                    + _bce(self.discriminators[str(level)](mine[level].detach()), 0.0)
                    for level in self.levels
                )
                disc_loss.backward()
                disc_optimizer.step()
            reconstruction = F.mse_loss(self.decoder(mine, self.crop_size), images)
            loss = reconstruction
            if self.matching == "mmd":
                match = sum(
                    mk_mmd(
                        voxel_vectors(mine[level], self.voxels, generator),
                        voxel_vectors(real[level], self.voxels, generator),
                    )
                    for level in self.levels
                )
                loss = loss + self.match_weight * match
                match_value = float(match.detach())
            elif self.matching == "discriminator":
                # The discriminator's weights get gradients here too, but only its own optimiser steps them.
                match = sum(_bce(self.discriminators[str(level)](mine[level]), 1.0) for level in self.levels)
                loss = loss + self.match_weight * match
                match_value = float(match.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = float(reconstruction.detach())
            first = last if first is None else first
        self.substitute.eval()
        self.decoder.eval()
        return {
            "attack": self.name,
            "matching": self.matching,
            "steps": self.steps,
            "crops": len(aux_crops),
            "received": len(next(iter(targets.values()))),
            "mmd_before": mmd_before,
            "mmd_after": self.distribution_distance(aux_crops, targets),
            "match_last": match_value,
            "train_mse_first": first,
            "train_mse_last": last,
            "seconds": time.perf_counter() - start,
        }

    @torch.no_grad()
    def reconstruct(
        self, observed: Mapping[int | str, torch.Tensor], crop_size: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Decode observed features with the decoder trained on the substitute.

        Args:
            observed: level -> ``(B, features[level], ...)``; must hold every level in :attr:`levels`.
            crop_size: crop size ``(D, H, W)``; default: x0's size if observed, else the auxiliary crops' size.

        Returns:
            ``(reconstruction (B, 1, D, H, W), stats)``.
        """
        if self.crop_size is None:
            raise ValueError("SubstituteEncoderAttack.reconstruct needs fit() first")
        start = time.perf_counter()
        observed = check_observed(observed)
        # With x0 observed its size is the crop's; otherwise fall back to the auxiliary crops' size.
        size = crop_size or (None if 0 in observed else self.crop_size)
        reconstruction = decode_levels(self.decoder, self.levels, observed, size, self.device)
        return reconstruction, {
            "attack": self.name,
            "levels": list(self.levels),
            "seconds": time.perf_counter() - start,
        }


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))
