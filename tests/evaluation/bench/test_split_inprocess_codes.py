"""bench: an integer wire is quantized by the senders' trainers (sites' features, the server's gradients) as in the
job; the step is the host-quantized one, and the PCIe bytes per step are counted (none on a CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from splitunet.evaluation.bench.serialization import FeatureSerializer, flare_available
from splitunet.evaluation.bench.settings import ProblemSize
from splitunet.evaluation.bench.split_inprocess import InProcessSplit
from splitunet.evaluation.bench.step_timing import planner_for
from splitunet.evaluation.bench.timing import StepClock
from splitunet.evaluation.bench.wire import SimulatedWire
from splitunet.wire.codec import EncodedLevel, entry_bytes, quantize_affine
from splitunet.wire.protocol import DataKind

SIZE = ProblemSize("tiny", (32, 32, 32), 1, (4, 4, 8, 8, 16, 4), (0, 1, 2, 3))
CONFIG = SIZE.model_config(learning_rate=5e-3, weight_decay=0.0, seed=0)


def _one_step(data, device, device_codes: bool) -> tuple[InProcessSplit, float]:
    torch.manual_seed(0)
    split = InProcessSplit(data, ("t1gd",), CONFIG, device, "dice_ce", SimulatedWire("int8"))
    if not device_codes:
        # The filter-only path: the wire quantizes the dense host copies.
        split.sites[0].wire_bits = split.server.wire_bits = None
    loss = split.step(planner_for(data, SIZE, seed=0).next_plan(), StepClock(device))
    return split, loss


@pytest.mark.parametrize("use_flare", [False] + ([True] if flare_available() else []))
def test_serializers_can_hand_over_codes_undecoded(use_flare):
    serializer = FeatureSerializer(use_flare=use_flare)
    level = EncodedLevel.affine(torch.randn(1, 2, 4, 4, 4), 8)
    blob = serializer.dumps({0: level.payload}, {0: dict(level.encoding)}, DataKind.ACTIVATIONS)
    kept = serializer.loads(blob, DataKind.ACTIVATIONS, keep_encoded=True)[0]
    assert isinstance(kept, EncodedLevel) and torch.equal(kept.decode(), level.decode())


def test_both_sides_send_codes_and_a_cpu_copies_nothing(tiny_bench_data):
    # That the steps on them are the host-quantized steps: tests/site/test_site_wire_codes.py and
    # tests/server/test_server_wire_codes.py.
    coded, loss = _one_step(tiny_bench_data, torch.device("cpu"), device_codes=True)
    sent, returned = coded.last_up[0], coded.last_down[0]
    assert all(isinstance(value, EncodedLevel) for value in [*sent.values(), *returned.values()])
    assert math.isfinite(loss)
    assert coded.wire.payload_bytes == sum(value.nbytes for value in [*sent.values(), *returned.values()])
    dense, _ = _one_step(tiny_bench_data, torch.device("cpu"), device_codes=False)
    assert dense.wire.payload_bytes == coded.wire.payload_bytes
    for level, grad in dense.last_down[0].items():
        assert entry_bytes(*quantize_affine(grad, 8)) == returned[level].nbytes
    assert coded.pcie_bytes() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_both_sides_copy_codes_instead_of_float32(tiny_bench_data):
    cuda = torch.device("cuda")
    coded, _ = _one_step(tiny_bench_data, cuda, device_codes=True)
    dense, _ = _one_step(tiny_bench_data, cuda, device_codes=False)
    codes = sum(value.nbytes for value in coded.last_up[0].values())
    gradient_codes = sum(value.nbytes for value in coded.last_down[0].values())
    floats = sum(value.numel() * 4 for value in dense.last_up[0].values())  # gradients have the features' shapes
    # Site -> host: the features (the only thing a site copies out); host -> server device: the same again.
    assert dense.sites[0].staging.bytes_to_host - coded.sites[0].staging.bytes_to_host == floats - codes
    # Server -> host: the gradients; host -> site device: the same again.
    assert dense.server.staging.bytes_to_host - coded.server.staging.bytes_to_host == floats - gradient_codes
    assert dense.pcie_bytes() - coded.pcie_bytes() == 2 * (floats - codes) + 2 * (floats - gradient_codes)
