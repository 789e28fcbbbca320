"""Head and tail weights as FLARE ``WEIGHTS`` DXOs and back, for the averaging tasks.

FLARE's convention for model weights: a DXO of kind ``WEIGHTS`` mapping parameter names to numpy arrays. Keeping to
it lets FLARE's own weight filters (``ExcludeVars``, ``PercentilePrivacy``, ``SVTPrivacy``) act on what a hospital
uploads, while the bundle's feature filters pass it on unchanged. Names are the part's state-dict names prefixed by
the part: ``head.conv_0.conv_0.conv.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind

from splitunet.u_shape.protocol import HOSPITAL_PARTS

__all__ = ["parts_to_dxo", "dxo_to_parts", "weights_bytes"]


def parts_to_dxo(parts: Mapping[str, Mapping[str, torch.Tensor]], meta: dict | None = None) -> DXO:
    """A ``WEIGHTS`` DXO of every part's state dict (numpy arrays, dtypes kept)."""
    data = {
        f"{part}.{name}": tensor.detach().cpu().numpy().copy()
        for part, state in parts.items()
        for name, tensor in state.items()
    }
    return DXO(data_kind=DataKind.WEIGHTS, data=data, meta=dict(meta or {}))


def dxo_to_parts(dxo: DXO, *, party: str = "?") -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of :func:`parts_to_dxo`, checked.

    Raises:
        ValueError: naming ``party``, if the DXO is not ``WEIGHTS``, names a part other than head and tail, holds
            something other than numeric arrays, or lacks a part.
    """
    if dxo.data_kind != DataKind.WEIGHTS:
        raise ValueError(f"{party} sent data kind {dxo.data_kind!r}, expected {DataKind.WEIGHTS!r}")
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in HOSPITAL_PARTS}
    for key, value in (dxo.data or {}).items():
        part, _, name = str(key).partition(".")
        if part not in parts or not name:
            raise ValueError(f"{party} sent weight {key!r}, which names no part of {HOSPITAL_PARTS}")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
            raise ValueError(f"{party} sent weight {key!r} as {type(value).__name__}, expected a numeric array")
        parts[part][name] = torch.from_numpy(np.array(value, copy=True))
    empty = [part for part, state in parts.items() if not state]
    if empty:
        raise ValueError(f"{party} sent no weights of {empty}")
    return parts


def weights_bytes(dxo: DXO) -> int:
    """Bytes of the arrays a ``WEIGHTS`` DXO carries (serialization headers aside)."""
    return sum(int(v.nbytes) for v in (dxo.data or {}).values() if isinstance(v, (np.ndarray, torch.Tensor)))
