"""A site's encoder weights as a FLARE ``WEIGHTS`` DXO and back, for the averaging of encoders that share a modality.

FLARE's convention for model weights: a DXO of kind ``WEIGHTS`` mapping parameter names (the encoder's state-dict
names, e.g. ``conv_0.conv_0.conv.weight``) to numpy arrays. Keeping to it lets FLARE's own weight filters
(``ExcludeVars``, ``PercentilePrivacy``, ``SVTPrivacy``) in a site's privacy scope act on what the site uploads,
while the bundle's feature filters pass it on unchanged. Both sides use this module; it loads no server or site code.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind

__all__ = ["encoder_to_dxo", "dxo_to_encoder", "weights_bytes"]


def encoder_to_dxo(state: Mapping[str, torch.Tensor | np.ndarray], meta: dict | None = None) -> DXO:
    """A ``WEIGHTS`` DXO of an encoder's state dict (numpy copies, dtypes kept)."""
    data = {}
    for name, value in state.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        data[str(name)] = array.copy()
    return DXO(data_kind=DataKind.WEIGHTS, data=data, meta=dict(meta or {}))


def dxo_to_encoder(
    dxo: DXO, *, party: str = "?", expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """The arrays of an encoder's ``WEIGHTS`` DXO, checked.

    Args:
        dxo: the DXO.
        party: who sent it (named in errors).
        expected: name -> shape the encoder has; the DXO must hold exactly these names with these shapes.

    Returns:
        name -> numpy array.

    Raises:
        ValueError: naming ``party``, if the DXO is of another kind, holds something other than numeric arrays,
            or (with ``expected``) other names or shapes.
    """
    if dxo.data_kind != DataKind.WEIGHTS:
        raise ValueError(f"{party} sent data kind {dxo.data_kind!r}, expected {DataKind.WEIGHTS!r}")
    arrays = {}
    for name, value in (dxo.data or {}).items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
            raise ValueError(f"{party} sent weight {name!r} as {type(value).__name__}, expected a numeric array")
        arrays[str(name)] = value
    if not arrays:
        raise ValueError(f"{party} sent no encoder weights")
    if expected is not None:
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        if missing or extra:
            raise ValueError(f"{party} sent other encoder weights: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, shape in expected.items():
            if tuple(arrays[name].shape) != tuple(shape):
                raise ValueError(
                    f"{party} sent weight {name!r} of shape {tuple(arrays[name].shape)}, expected {tuple(shape)}"
                )
    return arrays


def weights_bytes(dxo: DXO) -> int:
    """Bytes of the arrays a ``WEIGHTS`` DXO carries (serialization headers aside)."""
    return sum(int(value.nbytes) for value in (dxo.data or {}).values() if isinstance(value, np.ndarray))
