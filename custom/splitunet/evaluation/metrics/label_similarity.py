"""Overlap of an inferred label mask with the true one, and the chance level it must be compared with."""

from __future__ import annotations

import torch
from monai.metrics import compute_dice

__all__ = ["mask_dice", "expected_random_dice", "random_mask_like"]


def _check_masks(mask: torch.Tensor, truth: torch.Tensor) -> None:
    for name, tensor in (("mask", mask), ("truth", truth)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 5 or tensor.shape[1] != 1:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a (B, 1, D, H, W) tensor, got {shape}")
    if mask.shape != truth.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and truth {tuple(truth.shape)} differ in shape")
    for name, tensor in (("mask", mask), ("truth", truth)):
        if not torch.all((tensor == 0) | (tensor == 1)):
            raise ValueError(f"{name} must be binary (0/1)")


def mask_dice(mask: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks per sample (MONAI ``compute_dice``).

    Args:
        mask: inferred ``(B, 1, D, H, W)`` in {0, 1}.
        truth: true ``(B, 1, D, H, W)`` in {0, 1}, e.g. the whole-tumour (WT) region of the crop.

    Returns:
        ``(B,)`` Dice in [0, 1]; both masks empty counts as 1 (``ignore_empty=False``): nothing to find, nothing
        claimed.
    """
    _check_masks(mask, truth)
    dice = compute_dice(mask.float(), truth.float(), include_background=True, ignore_empty=False)
    return dice.reshape(-1)


def expected_random_dice(truth: torch.Tensor, marked: torch.Tensor | int) -> torch.Tensor:
    """Expected Dice of a mask of ``marked`` voxels placed uniformly at random, per sample.

    A random mask of ``m`` voxels in ``N`` hits ``m * |y| / N`` tumour voxels on average, so its Dice is about
    ``2 m |y| / (N (m + |y|))``: the chance level an inferred mask of the same size must beat.

    Args:
        truth: ``(B, 1, D, H, W)`` in {0, 1}.
        marked: voxels marked per sample, ``(B,)`` or one int.
    """
    truth = truth.detach().float().flatten(1)
    size = truth.sum(1)
    marked = torch.as_tensor(marked, dtype=torch.float32).expand_as(size)
    total = truth.shape[1]
    denominator = marked + size
    return torch.where(denominator > 0, 2 * marked * size / (total * denominator.clamp_min(1)), torch.ones_like(size))


def random_mask_like(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mask with as many marked voxels per sample as ``mask`` ``(B, 1, D, H, W)``."""
    flat = mask.detach().flatten(1)
    counts = flat.sum(1).long().tolist()
    out = torch.zeros_like(flat, dtype=torch.float32)
    for row, count in enumerate(counts):
        out[row, torch.randperm(flat.shape[1], generator=generator)[:count]] = 1.0
    return out.reshape(mask.shape)
