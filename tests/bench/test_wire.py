"""bench.wire: a simulated hop encodes, serializes and times what it sends."""

from __future__ import annotations

import pytest
import torch

from splitunet.bench.timing import StepClock
from splitunet.bench.wire import SimulatedWire, encode_levels
from splitunet.protocol import DataKind

CPU = torch.device("cpu")
LEVELS = {0: torch.randn(2, 4, 8, 8, 8), 3: torch.randn(2, 8, 2, 2, 2)}


@pytest.mark.parametrize(("precision", "tolerance"), [("float32", 0.0), ("float16", 1e-2), ("int8", 0.05)])
def test_send_returns_what_the_receiver_decodes(precision, tolerance):
    wire = SimulatedWire(CPU, precision)
    clock = StepClock(CPU)
    received = wire.send(LEVELS, DataKind.ACTIVATIONS, "site0", clock)
    for level, tensor in LEVELS.items():
        assert received[level].shape == tensor.shape
        assert (received[level].float() - tensor).abs().max() <= tolerance
    parts = clock.finish()
    assert parts["serialization"] > 0
    assert "host_transfer" not in parts  # nothing to copy on a CPU device
    assert wire.payload_bytes > 0 and wire.serialized_bytes >= wire.payload_bytes


def test_payload_bytes_follow_the_precision():
    sizes = {}
    for precision in ("float32", "float16", "int8"):
        wire = SimulatedWire(CPU, precision)
        wire.send(LEVELS, DataKind.GRADIENTS, "server0", StepClock(CPU))
        sizes[precision] = wire.payload_bytes
    assert sizes["float16"] * 2 == sizes["float32"]
    assert sizes["int8"] < sizes["float16"]


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        encode_levels(LEVELS, "int3")
    with pytest.raises(ValueError, match="precision"):
        SimulatedWire(CPU, "bfloat16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_hop_goes_through_pinned_host_buffers():
    device = torch.device("cuda")
    wire = SimulatedWire(device, "float32")
    clock = StepClock(device)
    sent = {level: tensor.to(device) for level, tensor in LEVELS.items()}
    received = wire.send(sent, DataKind.ACTIVATIONS, "site0", clock)
    for level, tensor in sent.items():
        assert received[level].device.type == "cuda"
        assert torch.equal(received[level], tensor)
    assert clock.finish()["host_transfer"] > 0
