"""The server's half of Split-U-Net: level-wise fusion of the sites' features, BasicUNet's decoder, a head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import UpCat
from torch import nn

from splitunet.networks.layers import DEFAULT_ACT, DEFAULT_NORM

__all__ = ["ServerDecoder", "FUSIONS"]

FUSIONS = ("concat", "mean")
_BOTTLENECK = 4


class ServerDecoder(nn.Module):
    """Fuses N sites' encoder features per level and decodes them with BasicUNet's ``upcat_4..upcat_1``.

    With ``fusion="concat"`` the channels of level ``l`` are ``num_sites * features[l]`` and the network equals
    a multi-encoder U-Net trained in one place (Roth et al., Split-U-Net, DeCaF@MICCAI 2022). With
    ``fusion="mean"`` level features are averaged over the sites present, so a modality may be absent.

    Args:
        num_sites: number of sites (encoders) feeding the decoder.
        features: BasicUNet's six feature sizes (five given: the sixth repeats the first).
        skip_levels: skip levels among x0..x3 that the sites send; the bottleneck x4 is always required. A
            level left out gets an up-sampling block without skip connection.
        fusion: ``"concat"`` or ``"mean"``.
        out_channels: output channels (3: TC, WT, ET logits for sigmoid).
        act, norm, bias, dropout, upsample: as BasicUNet.
        spatial_dims: 3 for volumes.
    """

    def __init__(
        self,
        num_sites: int,
        features: Sequence[int] = (16, 16, 32, 64, 128, 16),
        skip_levels: Sequence[int] = (0, 1, 2, 3),
        fusion: str = "concat",
        out_channels: int = 3,
        act: str | tuple = DEFAULT_ACT,
        norm: str | tuple = DEFAULT_NORM,
        bias: bool = True,
        dropout: float | tuple = 0.0,
        upsample: str = "deconv",
        spatial_dims: int = 3,
    ):
        super().__init__()
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if len(features) not in (5, 6):
            raise ValueError(f"features must hold 5 or 6 ints, got {tuple(features)}")
        levels = sorted({int(level) for level in skip_levels})
        if any(not 0 <= level < _BOTTLENECK for level in levels):
            raise ValueError(f"skip_levels must be within 0..3 (x4 is always sent), got {tuple(skip_levels)}")
        fea = tuple(int(f) for f in features) + (int(features[0]),) * (6 - len(features))
        self.num_sites = num_sites
        self.fusion = fusion
        self.features = fea
        self.skip_levels = tuple(levels)
        width = num_sites if fusion == "concat" else 1
        self.level_channels = tuple(width * f for f in fea[:5])

        def skip(level: int) -> int:
            return self.level_channels[level] if level in self.skip_levels else 0

        c = self.level_channels
        # upcat_4 takes the fused bottleneck; later blocks take the previous block's output (fea[l] channels).
        self.upcat_4 = UpCat(spatial_dims, c[4], skip(3), fea[3], act, norm, bias, dropout, upsample)
        self.upcat_3 = UpCat(spatial_dims, fea[3], skip(2), fea[2], act, norm, bias, dropout, upsample)
        self.upcat_2 = UpCat(spatial_dims, fea[2], skip(1), fea[1], act, norm, bias, dropout, upsample)
        self.upcat_1 = UpCat(spatial_dims, fea[1], skip(0), fea[5], act, norm, bias, dropout, upsample, halves=False)
        self.final_conv = Conv["conv", spatial_dims](fea[5], out_channels, kernel_size=1)

    @property
    def required_levels(self) -> tuple[int, ...]:
        """Levels every site must send: the skip levels and the bottleneck."""
        return self.skip_levels + (_BOTTLENECK,)

    def fuse(self, site_features: Sequence[Mapping[int, torch.Tensor] | None]) -> dict[int, torch.Tensor]:
        """Check the sites' features and fuse them per level."""
        if len(site_features) != self.num_sites:
            raise ValueError(f"expected features from {self.num_sites} sites, got {len(site_features)}")
        present = [(i, f) for i, f in enumerate(site_features) if f is not None]
        if not present:
            raise ValueError("no site sent features")
        if len(present) < self.num_sites and self.fusion != "mean":
            missing = [i for i, f in enumerate(site_features) if f is None]
            raise ValueError(f"sites {missing} sent no features; only fusion='mean' tolerates an absent site")
        fused = {}
        for level in self.required_levels:
            tensors = []
            for site, features in present:
                if level not in features:
                    raise ValueError(
                        f"site {site} did not send level x{level}; the decoder needs {self.required_levels}"
                    )
                if features[level].shape[1] != self.features[level]:
                    raise ValueError(
                        f"site {site} level x{level} has {features[level].shape[1]} channels, "
                        f"expected {self.features[level]}"
                    )
                tensors.append(features[level])
            fused[level] = torch.cat(tensors, dim=1) if self.fusion == "concat" else torch.stack(tensors).mean(0)
        for site, features in present:
            unexpected = set(features) - set(self.required_levels)
            if unexpected:
                raise ValueError(f"site {site} sent levels {sorted(unexpected)} the decoder is not configured for")
        return fused

    def forward(
        self,
        site_features: Sequence[Mapping[int, torch.Tensor] | None],
        spatial_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Decode the sites' features (site ``i``'s dict maps level -> ``(B, features[l], ...)``).

        Args:
            site_features: per site in fixed order, level index -> tensor (``None`` for an absent site, mean
                fusion only).
            spatial_size: ``(D, H, W)`` of the encoded input. Needed only when a skip level is not sent and a
                size is not divisible by 16: it tells each skip-less up-sampling block the size to pad to.

        Returns:
            logits ``(B, out_channels, D, H, W)`` at the resolution of level x0.
        """
        fused = self.fuse(site_features)
        skips = [self._skip(fused, level, spatial_size) for level in range(_BOTTLENECK)]
        u4 = self.upcat_4(fused[4], skips[3])
        u3 = self.upcat_3(u4, skips[2])
        u2 = self.upcat_2(u3, skips[1])
        u1 = self.upcat_1(u2, skips[0])
        return self.final_conv(u1)

    @staticmethod
    def _skip(fused: dict[int, torch.Tensor], level: int, spatial_size: Sequence[int] | None) -> torch.Tensor | None:
        if level in fused:
            return fused[level]
        if spatial_size is None:
            return None
        # A zero-channel skip carries only the spatial size (max-pooling floors each halving), so that UpCat
        # pads odd sizes exactly as it does with a real skip connection.
        size = [int(s) for s in spatial_size]
        for _ in range(level):
            size = [s // 2 for s in size]
        bottleneck = fused[_BOTTLENECK]
        return bottleneck.new_empty((bottleneck.shape[0], 0, *size))
