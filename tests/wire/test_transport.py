"""transport: tensors through DXO and FOBS keep dtype and shape; wrong payloads are named."""

from __future__ import annotations

import pytest
import torch
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.fuel.utils import fobs

from splitunet.wire.codec import ENCODING_META_KEY, SENDER_ENCODED_META_KEY, EncodedLevel
from splitunet.wire.protocol import DataKind
from splitunet.wire.transport import control_dxo, dxo_to_features, features_to_dxo, register_tensor_support


def _round_trip(dxo):
    register_tensor_support()
    return from_shareable(fobs.loads(fobs.dumps(dxo.to_shareable())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_dtype_and_shape_survive_serialization(dtype):
    features = {0: torch.randn(2, 4, 9, 10, 11).to(dtype), 4: torch.randn(2, 16, 1, 2, 3).to(dtype)}
    received = dxo_to_features(
        _round_trip(features_to_dxo(features, DataKind.ACTIVATIONS, {"i": 3})), DataKind.ACTIVATIONS
    )
    assert received.keys() == features.keys()
    for level, tensor in features.items():
        assert received[level].dtype == dtype
        assert torch.equal(received[level], tensor)


def test_meta_and_control_messages_survive():
    dxo = _round_trip(control_dxo({"plan": {"keys": ["ab"], "origins": [[0, 1, 2]]}}))
    assert dxo.data_kind == DataKind.CONTROL
    assert dxo.get_meta_prop("plan")["origins"] == [[0, 1, 2]]


def test_wrong_kind_names_the_party():
    dxo = features_to_dxo({0: torch.zeros(1)}, DataKind.GRADIENTS)
    with pytest.raises(ValueError, match="site-7 sent data kind"):
        dxo_to_features(dxo, DataKind.ACTIVATIONS, party="site-7")


@pytest.mark.parametrize("data", [{"weights": torch.zeros(1)}, {"x0": [1.0, 2.0]}, {}])
def test_unexpected_payloads_are_rejected(data):
    with pytest.raises(ValueError, match="site-2"):
        dxo_to_features(DXO(DataKind.ACTIVATIONS, data=data), DataKind.ACTIVATIONS, party="site-2")


def test_tensors_are_detached_and_on_cpu():
    tensor = torch.randn(3, requires_grad=True) * 2
    packed = features_to_dxo({1: tensor}, DataKind.ACTIVATIONS)
    assert not packed.data["x1"].requires_grad


def test_sender_encoded_levels_travel_as_codes_and_can_stay_encoded():
    level = EncodedLevel.affine(torch.randn(2, 4, 8, 8, 8), 8)
    dxo = features_to_dxo({0: level, 1: torch.randn(2, 8, 4, 4, 4)}, DataKind.ACTIVATIONS)
    assert dxo.data["x0"].dtype == torch.uint8 and dxo.meta[SENDER_ENCODED_META_KEY] == {"x0": 8}
    assert set(dxo.meta[ENCODING_META_KEY]) == {"x0"}
    kept = dxo_to_features(dxo, DataKind.ACTIVATIONS, keep_encoded=True)
    assert isinstance(kept[0], EncodedLevel) and torch.equal(kept[0].decode(), level.decode())
    assert torch.equal(dxo_to_features(dxo, DataKind.ACTIVATIONS)[0], level.decode())
    dxo.meta[ENCODING_META_KEY]["x0"]["step"] = -dxo.meta[ENCODING_META_KEY]["x0"]["step"]
    with pytest.raises(ValueError, match="site-7 sent x0 with a malformed affine encoding: a step is negative"):
        dxo_to_features(dxo, DataKind.ACTIVATIONS, party="site-7", keep_encoded=True)
