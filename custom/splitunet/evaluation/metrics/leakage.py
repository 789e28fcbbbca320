"""Leakage relative to an uninformed prior: how much better than guessing the mean image an attack does.

The prior is what the attacker knows without the features: the voxel-wise mean of auxiliary crops of the same
modality (:func:`mean_image_prior`). The server chooses each crop, so for a fair baseline use auxiliary crops cut
at the same origin and flips as the attacked crop (registered brains make that mean a blurred brain); without
the plan, random crops of auxiliary cases. Relative leakage (docs/design.md, "Threat models")::

    (SSIM(reconstruction) - SSIM(prior)) / SSIM(prior)

0 for the prior itself, > 0 when the attack beats it, < 0 when it does worse than guessing.

An attack that does worse than the prior has failed, not been stopped: the attacker could have submitted the prior
instead. So each result also carries ``ssim_reported = max(SSIM, SSIM prior)``, the leak a defense is judged by,
and SSIM inside the brain (``ssim_brain``, :func:`~splitunet.evaluation.metrics.image_similarity.brain_mask`),
where an easy zero background cannot lift the score.
"""

from __future__ import annotations

import math

import torch

from splitunet.evaluation.metrics.image_similarity import brain_mask, psnr_3d, ssim_3d

__all__ = ["mean_image_prior", "relative_leakage", "image_leakage"]


def mean_image_prior(images: torch.Tensor) -> torch.Tensor:
    """Voxel-wise mean of auxiliary crops ``(N, 1, D, H, W)`` -> ``(1, 1, D, H, W)``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[1] != 1 or not len(images):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty (N, 1, D, H, W) tensor, got {shape}")
    return images.detach().float().mean(0, keepdim=True)


def relative_leakage(ssim_reconstruction: float, ssim_prior: float) -> float:
    """``(ssim_reconstruction - ssim_prior) / ssim_prior``; NaN when ``ssim_prior <= 0`` (no meaningful baseline)."""
    if not ssim_prior > 0:
        return math.nan
    return (float(ssim_reconstruction) - float(ssim_prior)) / float(ssim_prior)


def image_leakage(reconstruction: torch.Tensor, original: torch.Tensor, prior: torch.Tensor) -> dict:
    """SSIM and PSNR of a reconstruction and of the prior against the original, and the relative leakage.

    Args:
        reconstruction: ``(B, 1, D, H, W)``.
        original: ``(B, 1, D, H, W)``, the crops the site encoded.
        prior: ``(B or 1, 1, D, H, W)``, e.g. :func:`mean_image_prior` of auxiliary crops.

    Returns:
        JSON-serializable ``{"ssim", "psnr", "ssim_prior", "psnr_prior", "relative_leakage", "ssim_brain",
        "ssim_prior_brain", "ssim_reported"}``, each a list over the batch, plus ``"mean"`` holding the batch means
        (relative leakage of the mean SSIMs; ``ssim_reported`` = max of the mean SSIM and the mean prior SSIM).
    """
    if not isinstance(prior, torch.Tensor) or prior.dim() != 5 or prior.shape[0] not in (1, original.shape[0]):
        raise ValueError(f"prior must be (B or 1, 1, D, H, W) for a batch of {original.shape[0]}")
    prior = prior.expand_as(original)
    ssim = ssim_3d(reconstruction, original)
    ssim_prior = ssim_3d(prior, original)
    psnr = psnr_3d(reconstruction, original)
    psnr_prior = psnr_3d(prior, original)
    brain = brain_mask(original)
    ssim_brain = ssim_3d(reconstruction, original, mask=brain)
    ssim_prior_brain = ssim_3d(prior, original, mask=brain)
    result = {
        "ssim": ssim.tolist(),
        "psnr": psnr.tolist(),
        "ssim_prior": ssim_prior.tolist(),
        "psnr_prior": psnr_prior.tolist(),
        "relative_leakage": [relative_leakage(s, p) for s, p in zip(ssim.tolist(), ssim_prior.tolist())],
        "ssim_brain": ssim_brain.tolist(),
        "ssim_prior_brain": ssim_prior_brain.tolist(),
        "ssim_reported": torch.maximum(ssim, ssim_prior).tolist(),
    }
    result["mean"] = {
        "ssim": float(ssim.mean()),
        "psnr": float(psnr.mean()),
        "ssim_prior": float(ssim_prior.mean()),
        "psnr_prior": float(psnr_prior.mean()),
        "relative_leakage": relative_leakage(float(ssim.mean()), float(ssim_prior.mean())),
        "ssim_brain": float(ssim_brain.nanmean()),
        "ssim_prior_brain": float(ssim_prior_brain.nanmean()),
        "ssim_reported": max(float(ssim.mean()), float(ssim_prior.mean())),
    }
    return result
