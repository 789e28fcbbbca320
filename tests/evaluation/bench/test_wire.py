"""bench.wire: a simulated hop encodes, serializes and times what it sends."""

from __future__ import annotations

import pytest
import torch

from splitunet.evaluation.bench.timing import StepClock
from splitunet.evaluation.bench.wire import SimulatedWire, encode_levels
from splitunet.wire.protocol import DataKind

CPU = torch.device("cpu")
LEVELS = {0: torch.randn(2, 4, 8, 8, 8), 3: torch.randn(2, 8, 2, 2, 2)}


@pytest.mark.parametrize(("precision", "tolerance"), [("float32", 0.0), ("float16", 1e-2), ("int8", 0.05)])
def test_send_returns_what_the_receiver_decodes(precision, tolerance):
    wire = SimulatedWire(precision)
    clock = StepClock(CPU)
    received = wire.send(LEVELS, DataKind.ACTIVATIONS, clock)
    for level, tensor in LEVELS.items():
        assert received[level].shape == tensor.shape
        assert (received[level].float() - tensor).abs().max() <= tolerance
    assert clock.finish()["serialization"] > 0
    assert wire.payload_bytes > 0 and wire.serialized_bytes >= wire.payload_bytes


def test_payload_bytes_follow_the_precision():
    sizes = {}
    for precision in ("float32", "float16", "int8"):
        wire = SimulatedWire(precision)
        wire.send(LEVELS, DataKind.GRADIENTS, StepClock(CPU))
        sizes[precision] = wire.payload_bytes
    assert sizes["float16"] * 2 == sizes["float32"]
    assert sizes["int8"] < sizes["float16"]


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        encode_levels(LEVELS, "int3")
    with pytest.raises(ValueError, match="precision"):
        SimulatedWire("bfloat16")
