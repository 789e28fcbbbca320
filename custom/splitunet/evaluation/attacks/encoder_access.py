"""The attacker's copy of a site encoder: the real one (white-box) or a fresh surrogate (black-box), run only as
deep as the levels it needs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from splitunet.networks import SiteEncoder, seeded_encoder
from splitunet.networks.initialisation import redraw_convolutions
from splitunet.wire.protocol import NUM_LEVELS

__all__ = ["build_encoder", "input_channels", "EncoderPrefix"]

# SiteEncoder's blocks in order: block l produces level x_l.
_BLOCKS = ("conv_0", "down_1", "down_2", "down_3", "down_4")
# The first convolution's weight ``(out, in, k, k, k)``: its second dimension is the encoder's input channels.
_FIRST_WEIGHT = "conv_0.conv_0.conv.weight"


def build_encoder(
    features: Sequence[int],
    state_dict: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    in_channels: int | None = None,
) -> SiteEncoder:
    """A :class:`SiteEncoder` with the site's architecture (one modality, or the U-shape's four-channel head).

    Args:
        features: BasicUNet feature sizes of the job (5 or 6 ints), e.g. ``(8, 16, 32, 64, 128)``.
        state_dict: the site encoder's weights (white-box). ``None``: a fresh random initialisation, drawn
            from ``seed`` without touching torch's global random state (black-box surrogate).
        seed: initialisation seed when ``state_dict`` is ``None``.
        in_channels: input channels; default: those of ``state_dict``'s first convolution, else 1.

    Raises:
        ValueError: ``features`` is malformed, or ``state_dict`` does not fit that architecture.
    """
    if in_channels is None:
        first = (state_dict or {}).get(_FIRST_WEIGHT)
        in_channels = int(first.shape[1]) if isinstance(first, torch.Tensor) and first.dim() == 5 else 1
    if in_channels == 1:
        # The sites' own initialisation (splitunet.networks.initialisation), so a known seed rebuilds their encoder.
        encoder = seeded_encoder(features, seed)
    else:
        with torch.random.fork_rng(devices=[]):
            encoder = SiteEncoder(in_channels=in_channels, features=tuple(int(f) for f in features))
        encoder = redraw_convolutions(encoder, seed)
    if state_dict is not None:
        try:
            encoder.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"state_dict does not fit SiteEncoder(features={tuple(features)}): {str(error).splitlines()[0]}"
            ) from None
    return encoder


def input_channels(encoder: SiteEncoder) -> int:
    """The channels an encoder's input has (1 for a modality site's, 4 for the U-shape's head)."""
    return int(encoder.conv_0.conv_0.conv.in_channels)


class EncoderPrefix(nn.Module):
    """The blocks of a :class:`SiteEncoder` up to the deepest requested level (shared, not copied).

    Inverting x0 needs only ``conv_0``; skipping the deeper blocks makes each optimisation step several times
    cheaper on CPU.

    Args:
        encoder: the encoder whose blocks are used.
        levels: levels whose features :meth:`forward` returns.
    """

    def __init__(self, encoder: SiteEncoder, levels: Iterable[int]):
        super().__init__()
        self.levels = tuple(sorted({int(level) for level in levels}))
        if not self.levels or any(not 0 <= level < NUM_LEVELS for level in self.levels):
            raise ValueError(f"levels must be a non-empty subset of 0..{NUM_LEVELS - 1}, got {self.levels}")
        self.blocks = nn.ModuleList(getattr(encoder, name) for name in _BLOCKS[: self.levels[-1] + 1])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """``x``: ``(B, 1, D, H, W)`` -> ``{level: (B, features[level], ...)}`` for the requested levels."""
        out = {}
        for level, block in enumerate(self.blocks):
            x = block(x)
            if level in self.levels:
                out[level] = x
        return out
