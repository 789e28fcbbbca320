"""Split-U-Net in one process: the same encoders and decoder as the split run, for equivalence and baselines."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from splitunet.networks.server_decoder import ServerDecoder
from splitunet.networks.site_encoder import SiteEncoder

__all__ = ["MonolithicSplitUNet"]


class MonolithicSplitUNet(nn.Module):
    """N modality encoders and one decoder in a single module (Roth et al., Split-U-Net, DeCaF@MICCAI 2022).

    Channel ``i`` of the input goes to encoder ``i``; the decoder fuses their features exactly as the FLARE
    server does. With shared modules (:meth:`from_parts`) its autograd is the reference the split run must match;
    built fresh it is the centralized baseline.

    Args:
        num_sites: number of modalities (input channels), one encoder each.
        features, skip_levels, fusion, out_channels: as :class:`ServerDecoder`.
    """

    def __init__(
        self,
        num_sites: int = 4,
        features: Sequence[int] = (16, 16, 32, 64, 128, 16),
        skip_levels: Sequence[int] = (0, 1, 2, 3),
        fusion: str = "concat",
        out_channels: int = 3,
    ):
        super().__init__()
        self.encoders = nn.ModuleList(SiteEncoder(1, features) for _ in range(num_sites))
        self.decoder = ServerDecoder(num_sites, features, skip_levels, fusion, out_channels)

    @classmethod
    def from_parts(cls, encoders: Sequence[SiteEncoder], decoder: ServerDecoder) -> "MonolithicSplitUNet":
        """Wrap existing encoders and decoder (shared, not copied)."""
        if len(encoders) != decoder.num_sites:
            raise ValueError(f"decoder expects {decoder.num_sites} encoders, got {len(encoders)}")
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.encoders = nn.ModuleList(encoders)
        model.decoder = decoder
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, num_sites, D, H, W)`` -> logits ``(B, out_channels, D, H, W)``."""
        if x.shape[1] != len(self.encoders):
            raise ValueError(f"input has {x.shape[1]} channels, expected one per site ({len(self.encoders)})")
        levels = self.decoder.required_levels
        site_features = []
        for channel, encoder in enumerate(self.encoders):
            features = encoder(x[:, channel : channel + 1])
            site_features.append({level: features[level] for level in levels})
        return self.decoder(site_features, spatial_size=x.shape[2:])
