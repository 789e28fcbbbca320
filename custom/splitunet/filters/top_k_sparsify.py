"""Top-k sparsification: only the largest-magnitude fraction of each sample's features leaves the party."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.filters.base import FeatureFilter
from splitunet.wire.codec import sparsify_top_k

__all__ = ["TopKSparsify"]


class TopKSparsify(FeatureFilter):
    """Keep the ``fraction`` largest-magnitude values of each sample at each level; the rest arrive as zeros.

    Sent sparse (values plus int32 indices, decoded to dense at the receiver by
    :func:`splitunet.wire.transport.dxo_to_features`), so below a fraction of about 0.5 it also cuts bytes. Must come
    last in a filter chain (filters after it refuse encoded levels).

    Args:
        fraction: share of values kept per sample and level, in (0, 1].
        levels: skip levels to sparsify (default every level sent).
        data_kinds: feature kinds to act on (default activations and gradients).
        log_every: log one line every this many calls.
    """

    def __init__(
        self,
        fraction: float,
        levels: Iterable[int] | None = None,
        data_kinds: Sequence[str] | None = None,
        log_every: int = 1,
    ):
        super().__init__(levels=levels, data_kinds=data_kinds, log_every=log_every)
        if not 0 < fraction <= 1:
            raise SplitUNetConfigError(f"TopKSparsify: fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def filter_features(self, features: dict[str, torch.Tensor], dxo: DXO, fl_ctx: FLContext):
        sparse, encodings, kept, total = {}, {}, 0, 0
        for key, tensor in features.items():
            sparse[key], encodings[key] = sparsify_top_k(tensor, self.fraction)
            kept += sparse[key].numel()
            total += tensor.numel()
        facts = {"fraction": self.fraction, "levels": sorted(features), "encodings": encodings}
        return sparse, facts, f"kept {kept}/{total} values ({kept / max(total, 1):.3f})"
