"""Feature tensors to bytes and back, as FLARE carries them in a task, or with torch alone where FLARE is absent.

With nvflare installed the round trip is the real one: :func:`splitunet.wire.transport.features_to_dxo`, a
``Shareable``, FOBS bytes (FLARE's ``TensorDecomposer`` stores tensors with safetensors), and
:func:`splitunet.wire.transport.dxo_to_features` at the receiver. The GPU machine has no nvflare, so there the same
payload goes through ``torch.save`` / ``torch.load`` instead, and the report names which serializer ran.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Mapping

import torch

from splitunet.wire.codec import ENCODING_META_KEY, EncodedLevel, decode_entry
from splitunet.wire.protocol import level_index, level_key

__all__ = ["FeatureSerializer", "flare_available"]


def flare_available() -> bool:
    """Whether nvflare can be imported here (without importing it)."""
    return importlib.util.find_spec("nvflare") is not None


class FeatureSerializer:
    """Turns per-level payloads (and their wire encodings) into bytes and back into dense tensors.

    Args:
        use_flare: ``True``: FLARE's DXO/FOBS path (needs nvflare); ``False``: ``torch.save``; ``None``: FLARE
            when installed.
    """

    def __init__(self, use_flare: bool | None = None):
        self.use_flare = flare_available() if use_flare is None else bool(use_flare)
        if self.use_flare:
            from splitunet.wire.transport import register_tensor_support

            register_tensor_support()
        self.name = "FLARE DXO in a Shareable, FOBS bytes" if self.use_flare else "torch.save (nvflare not installed)"

    def dumps(self, payloads: Mapping[int, torch.Tensor], encodings: Mapping[int, dict], data_kind: str) -> bytes:
        """Serialize CPU payloads of levels (``encodings[level]`` as :mod:`splitunet.wire.codec` records them)."""
        meta = {ENCODING_META_KEY: {level_key(level): dict(e) for level, e in encodings.items()}} if encodings else {}
        if self.use_flare:
            from nvflare.fuel.utils import fobs

            from splitunet.wire.transport import features_to_dxo

            return fobs.dumps(features_to_dxo(payloads, data_kind, meta).to_shareable())
        buffer = io.BytesIO()
        data = {level_key(level): tensor.detach().contiguous() for level, tensor in payloads.items()}
        torch.save({"kind": data_kind, "data": data, "meta": meta}, buffer)
        return buffer.getvalue()

    def loads(self, blob: bytes, data_kind: str, keep_encoded: bool = False) -> dict[int, torch.Tensor | EncodedLevel]:
        """Dense CPU tensors per level from :meth:`dumps` output, decoding any wire encoding (unless
        ``keep_encoded``: then encoded levels come as :class:`~splitunet.wire.codec.EncodedLevel`)."""
        if self.use_flare:
            from nvflare.apis.dxo import from_shareable
            from nvflare.fuel.utils import fobs

            from splitunet.wire.transport import dxo_to_features

            dxo = from_shareable(fobs.loads(blob))
            return dxo_to_features(dxo, data_kind, party="bench", keep_encoded=keep_encoded)
        content = torch.load(io.BytesIO(blob), weights_only=True)
        if content["kind"] != data_kind:
            raise ValueError(f"received data kind {content['kind']!r}, expected {data_kind!r}")
        encodings = content["meta"].get(ENCODING_META_KEY, {})
        return {
            level_index(key): (
                EncodedLevel(value, encodings[key])
                if keep_encoded and encodings.get(key)
                else decode_entry(value, encodings.get(key))
            )
            for key, value in content["data"].items()
        }
