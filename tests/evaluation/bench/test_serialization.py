"""bench.serialization: tensors to bytes and back, through FLARE's FOBS or torch alone."""

from __future__ import annotations

import pytest
import torch

from splitunet.evaluation.bench.serialization import FeatureSerializer, flare_available
from splitunet.evaluation.bench.wire import encode_levels
from splitunet.wire.protocol import DataKind

LEVELS = {0: torch.randn(2, 4, 8, 8, 8), 4: torch.randn(2, 8, 1, 1, 1)}
SERIALIZERS = [pytest.param(False, id="torch")] + ([pytest.param(True, id="flare")] if flare_available() else [])


@pytest.mark.parametrize("use_flare", SERIALIZERS)
def test_dense_round_trip_is_exact(use_flare):
    serializer = FeatureSerializer(use_flare=use_flare)
    blob = serializer.dumps(LEVELS, {}, DataKind.ACTIVATIONS)
    received = serializer.loads(blob, DataKind.ACTIVATIONS)
    assert received.keys() == LEVELS.keys()
    for level, tensor in LEVELS.items():
        assert torch.equal(received[level], tensor)
    assert len(blob) >= sum(t.numel() * 4 for t in LEVELS.values())


@pytest.mark.parametrize("use_flare", SERIALIZERS)
def test_int8_payload_is_decoded_at_the_receiver(use_flare):
    serializer = FeatureSerializer(use_flare=use_flare)
    payloads, encodings = encode_levels(LEVELS, "int8")
    received = serializer.loads(serializer.dumps(payloads, encodings, DataKind.GRADIENTS), DataKind.GRADIENTS)
    for level, tensor in LEVELS.items():
        assert received[level].dtype == tensor.dtype
        step = encodings[level]["step"].max()
        assert (received[level] - tensor).abs().max() <= step / 2 + 1e-6


def test_torch_path_checks_the_data_kind():
    serializer = FeatureSerializer(use_flare=False)
    blob = serializer.dumps(LEVELS, {}, DataKind.ACTIVATIONS)
    with pytest.raises(ValueError, match="expected"):
        serializer.loads(blob, DataKind.GRADIENTS)
    assert "torch.save" in serializer.name
