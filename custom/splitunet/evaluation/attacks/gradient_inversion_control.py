"""The positive control of the gradient inversion study: a model whose update does determine its input."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["DenseSegmenter"]


class DenseSegmenter(nn.Module):
    """The positive control: a linear layer over every voxel of every channel, and a linear map back to region logits.

    A first layer that sees the whole input is the textbook case where one sample's gradient determines the input
    (row ``i`` of its weight gradient is ``g_i * x``; Phong et al., IEEE TIFS 2018), so the attack must recover the
    crop here; if it does not, the attack is broken, whatever it scores on the U-Net.

    Args:
        in_channels: input channels.
        out_channels: region logits.
        crop_size: ``(D, H, W)``.
        hidden: width of the bottleneck.
    """

    def __init__(self, in_channels: int, out_channels: int, crop_size: Sequence[int], hidden: int = 4):
        super().__init__()
        self.crop_size = tuple(int(c) for c in crop_size)
        self.out_channels = out_channels
        voxels = int(np.prod(self.crop_size))
        self.encode = nn.Linear(in_channels * voxels, hidden)
        self.decode = nn.Linear(hidden, out_channels * voxels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W)`` -> logits ``(B, out_channels, D, H, W)``."""
        return self.decode(self.encode(x.flatten(1))).reshape(len(x), self.out_channels, *self.crop_size)
