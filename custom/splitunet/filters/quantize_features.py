"""Lower precision on the wire: float16, or per-channel affine integers of 8, 4, 2 or 1 bits."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from splitunet.errors import SplitUNetConfigError
from splitunet.filters.base import FeatureFilter, FilterRejection
from splitunet.wire.codec import ENCODING_META_KEY, SENDER_ENCODED_META_KEY, affine_layout, quantize_affine
from splitunet.wire.protocol import DataKind, MetaKey

__all__ = ["QuantizeFeatures", "PRECISIONS", "sender_encoding_bits", "common_sender_bits"]

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

    A site on a GPU quantizes before its device-to-host copy when this filter comes first in the chain of what it
    releases (:func:`sender_encoding_bits`); the levels then arrive as codes named under
    :data:`~splitunet.wire.codec.SENDER_ENCODED_META_KEY`. The filter checks them (this precision's bits, codes and
    scales that match their description, :func:`~splitunet.wire.codec.affine_layout`), refuses them otherwise, and
    reports them as its own, so the DXO it passes on is the one it would have made from the dense features.

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
        sender = set((dxo.meta or {}).get(SENDER_ENCODED_META_KEY) or {}) & set(features)
        # Levels the sender's trainer quantized for this filter are not "already encoded": they are this filter's.
        already = {
            key: value for key, value in ((dxo.meta or {}).get(ENCODING_META_KEY) or {}).items() if key not in sender
        }
        for key, tensor in features.items():
            if key in sender:
                encoding = dxo.meta[ENCODING_META_KEY].get(key) or {}
                self._check_sender_codes(key, tensor, encoding)
                quantized[key], encodings[key] = tensor, encoding
                max_steps.append(f"{key} {float(encoding['step'].max()):.3g}")
                continue
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

    def _check_sender_codes(self, key: str, payload: torch.Tensor, encoding: dict) -> None:
        """Refuse codes that the sender's trainer made otherwise than this filter would."""
        if encoding.get("scheme") != "affine" or encoding.get("bits") != self.bits:
            raise FilterRejection(
                f"{key} arrived encoded by the sender ({encoding.get('scheme')}, {encoding.get('bits')} bits), but "
                f"this filter's precision is {self.precision}"
            )
        try:
            affine_layout(payload, encoding)
        except ValueError as error:
            raise FilterRejection(f"{key} arrived with a malformed affine encoding: {error}") from None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        """The base class's pass, then: the sender's marks removed, and the trail's ``bytes_in`` those of the dense
        levels, so that what leaves does not depend on where the quantization ran."""
        sender = dict((dxo.meta or {}).get(SENDER_ENCODED_META_KEY) or {})
        result = super().process_dxo(dxo, shareable, fl_ctx)
        if not sender:
            return result
        encodings = (dxo.meta or {}).get(ENCODING_META_KEY) or {}
        taken = [key for key in sender if self.levels is None or int(key[1:]) in self.levels]
        extra = 0
        for key in taken:
            encoding = encodings.get(key) or {}
            dense = math.prod(int(s) for s in encoding.get("shape", ())) * getattr(torch, encoding["dtype"]).itemsize
            extra += dense - sum(
                t.numel() * t.element_size()
                for t in (dxo.data[key], *(v for v in encoding.values() if isinstance(v, torch.Tensor)))
            )
            sender.pop(key)
        if sender:
            result.meta[SENDER_ENCODED_META_KEY] = sender
        else:
            result.meta.pop(SENDER_ENCODED_META_KEY, None)
        result.meta[MetaKey.FILTER_TRAIL][-1]["bytes_in"] += extra
        return result


def sender_encoding_bits(chain: Sequence, data_kind: str = DataKind.ACTIVATIONS) -> int | None:
    """Bits to which a sender may quantize every level on its device, for this filter chain: those of its first
    filter, when that is a :class:`QuantizeFeatures` to integers acting on every level of ``data_kind``.

    Any other first filter needs the dense features (noise, dropout, a capture), so the sender leaves them dense.

    Args:
        chain: the filters of what the sender releases, in FLARE's order (a site: its scope's, then the job's).
        data_kind: the kind the sender releases.
    """
    first = chain[0] if chain else None
    if not isinstance(first, QuantizeFeatures) or first.bits is None or first.levels is not None:
        return None
    return first.bits if data_kind in first.data_kinds else None


def common_sender_bits(chains: Iterable[Sequence], data_kind: str = DataKind.ACTIVATIONS) -> int | None:
    """:func:`sender_encoding_bits` shared by every one of a sender's ``chains`` (each task it releases on), or
    ``None`` when they differ: one encoding on the device must suit every chain."""
    bits = {sender_encoding_bits(chain, data_kind) for chain in chains}
    return bits.pop() if len(bits) == 1 else None
