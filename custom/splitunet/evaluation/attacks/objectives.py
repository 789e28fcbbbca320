"""Loss terms shared by the optimisation attacks: feature matching and the 3D total-variation image prior."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["feature_matching_loss", "total_variation_3d"]


def feature_matching_loss(predicted: Mapping[int, torch.Tensor], observed: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the MSE between predicted and observed features, each divided by the observed mean square.

    The normalisation makes every level weigh the same whatever its scale (activations, or noised activations
    whose scale the defense set) and makes the loss 1 for an all-zero prediction.

    Args:
        predicted: level -> ``(B, C, D, H, W)``, for every level in ``observed``.
        observed: level -> ``(B, C, D, H, W)``.

    Returns:
        scalar tensor.
    """
    total = None
    for level, target in observed.items():
        term = (predicted[level] - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
        total = term if total is None else total + term
    return total


def total_variation_3d(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of a volume batch: mean absolute difference of neighbours along D, H and W, summed.

    MONAI 1.6 ships no total-variation loss, hence this one. The mean (not the sum) keeps the weight of the term
    independent of the crop size. Rudin, Osher and Fatemi, Physica D 1992; used as the image prior of model
    inversion by Mahendran and Vedaldi, CVPR 2015, and by UnSplit (Erdogan et al., WPES 2022).

    Args:
        x: ``(B, C, D, H, W)``, each spatial size >= 2.

    Returns:
        scalar tensor.
    """
    if x.dim() != 5 or min(x.shape[2:]) < 2:
        raise ValueError(f"total_variation_3d needs (B, C, D, H, W) with spatial sizes >= 2, got {tuple(x.shape)}")
    return (
        (x[:, :, 1:] - x[:, :, :-1]).abs().mean()
        + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
        + (x[:, :, :, :, 1:] - x[:, :, :, :, :-1]).abs().mean()
    )
