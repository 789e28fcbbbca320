"""The segmentation loss, shared by every party that holds labels: the vertical job's server, a horizontal
hospital, a U-shape hospital's tail.

The three BraTS regions overlap (ET inside TC inside WT), so each is an independent sigmoid output and every loss
here is a sum of per-region binary terms. MONAI's ``DiceCELoss(sigmoid=True)`` does not do that for several
channels: its cross-entropy is a softmax over the channels (``torch.nn.CrossEntropyLoss``) whatever ``sigmoid``
says, which gives background voxels no cross-entropy gradient at all and pulls the three regions' logits towards
each other. ``dice_ce`` is therefore MONAI's Dice on sigmoid outputs plus binary cross-entropy per region, the
region-based loss of nnU-Net.
"""

from __future__ import annotations

import torch
from monai.losses import DiceFocalLoss, DiceLoss

__all__ = ["LOSSES", "RegionDiceBCELoss", "make_loss"]

LOSSES = ("dice_ce", "dice_focal")

_SMOOTH = 1e-5


class RegionDiceBCELoss(torch.nn.Module):
    """Soft Dice plus binary cross-entropy, each region its own sigmoid.

    Both terms are means over the batch of per-case terms (Dice per case and region, cross-entropy per voxel), which
    is what DP-SGD's per-case gradients and the gradient-inversion attack assume.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_bce: weight of the binary cross-entropy term.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=_SMOOTH, smooth_dr=_SMOOTH)
        self.bce = torch.nn.BCEWithLogitsLoss()
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must match: one channel per region"
            )
        target = target.to(logits.dtype)
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target)


def make_loss(name: str) -> torch.nn.Module:
    """The loss on sigmoid outputs of the overlapping TC/WT/ET regions.

    Raises:
        ValueError: ``name`` is not one of :data:`LOSSES`.
    """
    if name == "dice_ce":
        return RegionDiceBCELoss()
    if name == "dice_focal":
        # MONAI's focal term is a sigmoid one unless asked for softmax: per region, as wanted.
        return DiceFocalLoss(sigmoid=True, smooth_nr=_SMOOTH, smooth_dr=_SMOOTH)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
