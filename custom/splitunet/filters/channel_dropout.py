"""Random masking of feature channels (or elements) with rescaling, as dropout does."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.filters.base import FeatureFilter

__all__ = ["ChannelDropout", "DROPOUT_MODES"]

DROPOUT_MODES = ("channel", "element")


class ChannelDropout(FeatureFilter):
    """Zero a random fraction ``rate`` of each sample's channels (whole feature maps) or elements, and scale the
    rest by ``1 / (1 - rate)`` so that every value keeps its expectation.

    Masking whole channels hides entire feature maps of a crop from the server at each release; the decoder
    learns not to rely on any one of them. The mask is drawn anew for every release.

    Args:
        rate: probability that a channel (or element) is zeroed, in [0, 1).
        mode: ``"channel"`` (one draw per sample and channel) or ``"element"`` (per voxel).
        levels: skip levels to mask (default every level sent).
        data_kinds: feature kinds to act on (default activations and gradients).
        seed: mask seed, for tests only (default: drawn from the OS).
        log_every: log one line every this many calls.
    """

    stateful = True  # its random generator

    def __init__(
        self,
        rate: float,
        mode: str = "channel",
        levels: Iterable[int] | None = None,
        data_kinds: Sequence[str] | None = None,
        seed: int | None = None,
        log_every: int = 1,
    ):
        super().__init__(levels=levels, data_kinds=data_kinds, log_every=log_every)
        if not 0 <= rate < 1:
            raise SplitUNetConfigError(f"ChannelDropout: rate must be in [0, 1), got {rate}")
        if mode not in DROPOUT_MODES:
            raise SplitUNetConfigError(f"ChannelDropout: mode must be one of {DROPOUT_MODES}, got {mode!r}")
        self.rate = float(rate)
        self.mode = mode
        self.generator = torch.Generator()
        self.generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))

    def mask(self, tensor: torch.Tensor) -> torch.Tensor:
        """Keep-mask (1 kept, 0 dropped) broadcastable to a ``(B, C, *spatial)`` tensor."""
        shape = tensor.shape[:2] + (1,) * (tensor.dim() - 2) if self.mode == "channel" else tensor.shape
        return (torch.rand(shape, generator=self.generator) >= self.rate).to(torch.float32)

    def filter_features(self, features: dict[str, torch.Tensor], dxo: DXO, fl_ctx: FLContext):
        masked, dropped, total = {}, 0, 0
        for key, tensor in features.items():
            keep = self.mask(tensor)
            masked[key] = (tensor.float() * keep / (1.0 - self.rate)).to(tensor.dtype)
            dropped += int((keep == 0).sum())
            total += keep.numel()
        facts = {"rate": self.rate, "mode": self.mode, "levels": sorted(features)}
        unit = "channels" if self.mode == "channel" else "elements"
        message = (
            f"zeroed {dropped}/{total} {unit} ({dropped / max(total, 1):.3f}, rate {self.rate:g}), "
            f"kept scaled by {1 / (1 - self.rate):.3g}"
        )
        return masked, facts, message
