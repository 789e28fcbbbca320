"""The one place where tensors become FLARE DXOs and back.

Activations and gradients travel as DXOs (kinds in :class:`splitunet.wire.protocol.DataKind`) inside task data and
task results, so FLARE filters see them. Torch tensors in a DXO need FLARE's ``TensorDecomposer`` registered
with FOBS on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from nvflare.apis.dxo import DXO

from splitunet.wire.codec import (
    ENCODING_META_KEY,
    SENDER_ENCODED_META_KEY,
    EncodedLevel,
    affine_layout,
    entry_bytes,
)
from splitunet.wire.protocol import DataKind, level_index, level_key

__all__ = ["register_tensor_support", "features_to_dxo", "dxo_to_features", "control_dxo", "payload_bytes"]

_registered = False


def register_tensor_support() -> None:
    """Register FLARE's torch tensor decomposer with FOBS (idempotent)."""
    global _registered
    if _registered:
        return
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.fuel.utils import fobs

    fobs.register(TensorDecomposer)
    _registered = True


def features_to_dxo(
    features: Mapping[int, torch.Tensor | EncodedLevel], data_kind: str, meta: dict | None = None
) -> DXO:
    """Pack per-level tensors (level index -> tensor) as a DXO with keys ``x0``..``x4``.

    Tensors are detached, moved to the CPU and made contiguous; dtype and shape are kept. A level the sender's
    trainer already encoded (an :class:`~splitunet.wire.codec.EncodedLevel`) goes in as its payload with its
    encoding record, as a quantizing filter would have put it, and is named under
    :data:`~splitunet.wire.codec.SENDER_ENCODED_META_KEY` for that filter to check and take as its own.
    """
    meta = dict(meta or {})
    data, encodings, sender_encoded = {}, {}, {}
    for level, value in features.items():
        key = level_key(level)
        if isinstance(value, EncodedLevel):
            value = value.map_tensors(lambda t: t.detach().cpu().contiguous())
            data[key], encodings[key] = value.payload, dict(value.encoding)
            sender_encoded[key] = int(value.encoding["bits"])
        else:
            data[key] = value.detach().cpu().contiguous()
    if encodings:
        meta[ENCODING_META_KEY] = {**(meta.get(ENCODING_META_KEY) or {}), **encodings}
        meta[SENDER_ENCODED_META_KEY] = sender_encoded
    return DXO(data_kind=data_kind, data=data, meta=meta)


def dxo_to_features(
    dxo: DXO,
    expected_kind: str,
    *,
    device: torch.device | str | None = None,
    party: str = "?",
    expected_levels: Iterable[int] | None = None,
    keep_encoded: bool = False,
) -> dict[int, torch.Tensor | EncodedLevel]:
    """Unpack :func:`features_to_dxo` output, checking kind, keys and types.

    Levels that a filter encoded (quantized, sparsified; see :mod:`splitunet.wire.codec`) are decoded to dense
    tensors, so callers always get what the sender's model produced, up to the filters' changes.

    Args:
        dxo: the received DXO.
        expected_kind: its data kind.
        device: where the returned tensors go; an encoded level is copied there first and decoded there.
        party: the sender, for messages.
        expected_levels: the levels it must hold.
        keep_encoded: return encoded levels as :class:`~splitunet.wire.codec.EncodedLevel` (on the host, affine
            codes checked against their description) for the caller to copy to its device and decode there once.

    Raises:
        ValueError: naming ``party``, if the DXO is of another kind, holds something other than level tensors,
            or (with ``expected_levels``) lacks or adds levels.
    """
    if dxo.data_kind != expected_kind:
        raise ValueError(f"{party} sent data kind {dxo.data_kind!r}, expected {expected_kind!r}")
    encodings = (dxo.meta or {}).get(ENCODING_META_KEY) or {}
    features = {}
    for key, value in (dxo.data or {}).items():
        try:
            level = level_index(key)
        except ValueError:
            raise ValueError(f"{party} sent unexpected entry {key!r} in {expected_kind}") from None
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{party} sent {key} as {type(value).__name__}, expected a torch tensor")
        encoding = encodings.get(key)
        if not encoding:
            features[level] = value if device is None else value.to(device)
            continue
        encoded = EncodedLevel(value, encoding)
        if device is not None:
            encoded = encoded.map_tensors(lambda t: t.to(device))
        if not keep_encoded:
            features[level] = encoded.decode()
            continue
        if encoding.get("scheme") == "affine":
            try:
                affine_layout(value, encoding)
            except ValueError as error:
                raise ValueError(f"{party} sent {key} with a malformed affine encoding: {error}") from None
        features[level] = encoded
    if not features:
        raise ValueError(f"{party} sent an empty {expected_kind}")
    if expected_levels is not None and set(features) != set(expected_levels):
        raise ValueError(
            f"{party} sent levels {[level_key(v) for v in sorted(features)]} in {expected_kind}, expected "
            f"{[level_key(v) for v in sorted(expected_levels)]}; a privacy filter that blocks or adds levels at "
            f"{party} must be matched by the job's skip_levels"
        )
    return features


def control_dxo(meta: dict) -> DXO:
    """A DXO without tensors (setup, plans, acknowledgements)."""
    return DXO(data_kind=DataKind.CONTROL, data={}, meta=dict(meta))


def payload_bytes(dxo: DXO) -> int:
    """Bytes of the tensors a DXO carries, as encoded on the wire (serialization headers aside)."""
    encodings = (dxo.meta or {}).get(ENCODING_META_KEY) or {}
    data = dxo.data or {}
    return sum(entry_bytes(value, encodings.get(key)) for key, value in data.items() if isinstance(value, torch.Tensor))
