"""A site's refusal to send chosen skip levels, whatever the job asks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from splitunet.errors import SplitUNetConfigError
from splitunet.filters.base import FeatureFilter
from splitunet.wire.protocol import NUM_LEVELS, DataKind, MetaKey, level_key

__all__ = ["BlockSkipLevels"]


class BlockSkipLevels(FeatureFilter):
    """Remove chosen skip levels from a site's activations before they leave it.

    The full-resolution level x0 carries the most image detail (the leak the Split-U-Net paper studies); a site
    that blocks it sends only coarser levels. The decoder must then be configured without those skip levels: the
    filter also marks the site's setup reply with the levels it blocks, so a job whose ``skip_levels`` still
    include them stops at setup with a message naming the site, before any training.

    Args:
        levels: skip levels never sent (0..3; the bottleneck x4 is what the decoder starts from and cannot be
            blocked).
        log_every: log one line every this many calls.
    """

    accepts_encoded = True  # removing a level is the same whatever its encoding

    def __init__(self, levels: Iterable[int] = (0,), log_every: int = 1):
        levels = list(levels)
        super().__init__(levels=levels, data_kinds=[DataKind.ACTIVATIONS], log_every=log_every)
        if NUM_LEVELS - 1 in self.levels:
            raise SplitUNetConfigError(
                f"BlockSkipLevels: the bottleneck {level_key(NUM_LEVELS - 1)} cannot be blocked; "
                f"levels must be within 0..{NUM_LEVELS - 2}, got {levels}"
            )

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        self._mark_setup_reply(shareable)
        return super().process(shareable, fl_ctx)

    def _mark_setup_reply(self, shareable: Shareable) -> None:
        # FLARE's DXOFilter skips DXOs without data, like the setup reply; mark that one here.
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO: nothing to mark
            return
        if dxo.data_kind != DataKind.CONTROL or dxo.get_meta_prop(MetaKey.MODALITY) is None:
            return
        blocked = set(dxo.get_meta_prop(MetaKey.BLOCKED_LEVELS) or ()) | set(self.levels)
        dxo.set_meta_prop(MetaKey.BLOCKED_LEVELS, sorted(blocked))
        dxo.update_shareable(shareable)

    def filter_features(self, features: dict[str, torch.Tensor], dxo: DXO, fl_ctx: FLContext):
        facts = {"blocks": [level_key(v) for v in self.levels], "withheld": sorted(features)}
        return {}, facts, f"withheld {sorted(features) or 'nothing'} (blocks {[level_key(v) for v in self.levels]})"
