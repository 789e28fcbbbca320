"""The site's half of Split-U-Net: MONAI BasicUNet's encoder on one modality."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.basic_unet import Down, TwoConv
from monai.utils import ensure_tuple_rep
from torch import nn

from splitunet.networks.layers import DEFAULT_ACT, DEFAULT_NORM

__all__ = ["SiteEncoder"]


class SiteEncoder(nn.Module):
    """BasicUNet's ``conv_0`` and ``down_1..down_4`` on one modality, returning every level's features.

    Roth et al., "Split-U-Net: Preventing Data Leakage in Split Learning for Collaborative Multi-Modal Brain
    Tumor Segmentation", DeCaF@MICCAI 2022; blocks from MONAI's ``BasicUNet`` (Falk et al., Nature Methods
    2019). Parameter names equal BasicUNet's, so a BasicUNet state dict's encoder entries load directly.

    Args:
        in_channels: input channels (1: one modality per site).
        features: BasicUNet's six feature sizes (five given: the sixth repeats the first); the encoder uses
            the first five.
        act: activation type and arguments.
        norm: normalisation type and arguments.
        bias: convolution bias.
        dropout: dropout ratio.
        spatial_dims: 3 for volumes.
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (16, 16, 32, 64, 128, 16),
        act: str | tuple = DEFAULT_ACT,
        norm: str | tuple = DEFAULT_NORM,
        bias: bool = True,
        dropout: float | tuple = 0.0,
        spatial_dims: int = 3,
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if len(features) not in (5, 6):
            raise ValueError(f"features must hold 5 or 6 ints, got {tuple(features)}")
        fea = ensure_tuple_rep(tuple(features) + (features[0],) * (6 - len(features)), 6)
        self.features = tuple(int(f) for f in fea)
        self.conv_0 = TwoConv(spatial_dims, in_channels, fea[0], act, norm, bias, dropout)
        self.down_1 = Down(spatial_dims, fea[0], fea[1], act, norm, bias, dropout)
        self.down_2 = Down(spatial_dims, fea[1], fea[2], act, norm, bias, dropout)
        self.down_3 = Down(spatial_dims, fea[2], fea[3], act, norm, bias, dropout)
        self.down_4 = Down(spatial_dims, fea[3], fea[4], act, norm, bias, dropout)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode ``x`` of shape ``(B, in_channels, D, H, W)``.

        Returns:
            ``[x0, x1, x2, x3, x4]``: ``x_l`` has ``features[l]`` channels at 1/2^l resolution (rounded down).
        """
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        return [x0, x1, x2, x3, x4]
