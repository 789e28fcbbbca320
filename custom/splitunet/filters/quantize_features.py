"""Lower precision on the wire: float16, or per-channel affine integers of 8, 4, 2 or 1 bits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.filters.base import FeatureFilter, FilterRejection
from splitunet.wire.codec import ENCODING_META_KEY, quantize_affine

__all__ = ["QuantizeFeatures", "PRECISIONS"]

# Precision name -> bits of affine integer codes (float16 is a plain cast).
PRECISIONS = {"float16": None, "int8": 8, "int4": 4, "int2": 2, "int1": 1}


class QuantizeFeatures(FeatureFilter):
    """Send features (or gradients) in lower precision.

    ``"float16"`` casts (the receiver's model computes in float32 again). ``"int8"``, ``"int4"``, ``"int2"`` and
    ``"int1"`` store each (sample, channel) as affine integer codes, ``x ~ min + code * step`` with
    ``step = (max - min) / (2**bits - 1)``, packed ``8 // bits`` codes per byte; the DXO describes the encoding
    and :func:`splitunet.wire.transport.dxo_to_features` decodes it at the receiver, so no paired filter is needed.
    The error per element is at most ``step / 2``. Fewer bits cut bytes on the wire; as measured
    (docs/privacy.md), int8 costs no Dice and leaves the inversion attacks as strong as on float32, so quantization
    is a bandwidth feature, not a defense.

    Integer encodings must come last in a filter chain (other filters refuse encoded levels). Levels that an
    earlier filter already encoded (a site's scope quantizing to fewer bits, or top-k) pass unchanged, so the
    main job's int8 transport can follow whatever a site's privacy policy applies first.

    Args:
        precision: one of ``"float16"``, ``"int8"``, ``"int4"``, ``"int2"``, ``"int1"``.
        levels: skip levels to quantize (default every level sent).
        data_kinds: feature kinds to act on (default activations and gradients).
        log_every: log one line every this many calls.
    """

    # Encoded levels are let through, not re-encoded (see above).
    accepts_encoded = True

    def __init__(
        self,
        precision: str = "int8",
        levels: Iterable[int] | None = None,
        data_kinds: Sequence[str] | None = None,
        log_every: int = 1,
    ):
        super().__init__(levels=levels, data_kinds=data_kinds, log_every=log_every)
        if precision not in PRECISIONS:
            raise SplitUNetConfigError(
                f"QuantizeFeatures: precision must be one of {list(PRECISIONS)}, got {precision!r}"
            )
        self.precision = precision
        self.bits = PRECISIONS[precision]

    def filter_features(self, features: dict[str, torch.Tensor], dxo: DXO, fl_ctx: FLContext):
        quantized, encodings, max_steps = {}, {}, []
        already = (dxo.meta or {}).get(ENCODING_META_KEY) or {}
        for key, tensor in features.items():
            if key in already:
                quantized[key] = tensor
                continue
            if not tensor.is_floating_point():
                raise FilterRejection(f"{key} is {tensor.dtype}, expected a floating-point tensor")
            if self.bits is None:
                quantized[key] = tensor.to(torch.float16)
                continue
            quantized[key], encodings[key] = quantize_affine(tensor, self.bits)
            max_steps.append(f"{key} {float(encodings[key]['step'].max()):.3g}")
        facts = {"precision": self.precision, "levels": sorted(set(features) - set(already))}
        if encodings:
            facts["encodings"] = encodings
        detail = f"; largest step per level: {', '.join(max_steps)}" if max_steps else ""
        kept = sorted(set(features) & set(already))
        detail += f"; {kept} already encoded, passed unchanged" if kept else ""
        return quantized, facts, f"quantized {facts['levels']} to {self.precision}{detail}"
