"""bench.centralized: the 4-channel baselines train and are scored by the server's validation."""

from __future__ import annotations

import math

import pytest
import torch

from splitunet.evaluation.bench.centralized import CentralizedTrainer
from splitunet.evaluation.bench.settings import ProblemSize
from splitunet.evaluation.bench.step_timing import planner_for
from splitunet.evaluation.bench.timing import StepClock

CPU = torch.device("cpu")
SIZE = ProblemSize("tiny", (32, 32, 32), 1, (4, 4, 8, 8, 16, 4), (0, 1, 2, 3))
CONFIG = SIZE.model_config(learning_rate=5e-3, weight_decay=0.0, seed=0)


@pytest.mark.parametrize("network", ["basic_unet", "monolithic_split_unet"])
def test_centralized_network_trains_and_validates(tiny_bench_data, network):
    trainer = CentralizedTrainer(tiny_bench_data, CONFIG, CPU, "dice_ce", network=network)
    planner = planner_for(tiny_bench_data, SIZE, seed=0)
    before = [p.detach().clone() for p in trainer.net.parameters()]
    clock = StepClock(CPU)
    assert math.isfinite(trainer.step(planner.next_plan(), clock))
    assert clock.finish()["compute"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.net.parameters()))
    dice = trainer.validate(SIZE.crop_size, sw_batch_size=2, overlap=0.0)
    assert all(0.0 <= dice[region] <= 1.0 for region in ("TC", "WT", "ET", "mean"))


def test_unknown_network_is_refused(tiny_bench_data):
    with pytest.raises(ValueError, match="network"):
        CentralizedTrainer(tiny_bench_data, CONFIG, CPU, "dice_ce", network="vnet")


def test_split_architecture_arm_trains_the_same_model_as_the_split_run(tiny_bench_data):
    # Same initial weights, same crops, float32 wire: splitting must not change the training, step for step.
    from splitunet.evaluation.bench.split_inprocess import InProcessSplit
    from splitunet.evaluation.bench.wire import SimulatedWire
    from splitunet.wire.protocol import MODALITIES

    central = CentralizedTrainer(tiny_bench_data, CONFIG, CPU, "dice_ce", network="monolithic_split_unet")
    split = InProcessSplit(tiny_bench_data, MODALITIES, CONFIG, CPU, "dice_ce", SimulatedWire("float32"))
    for index, site in enumerate(split.sites):
        assert all(
            torch.equal(a, b) for a, b in zip(site.encoder.parameters(), central.net.encoders[index].parameters())
        )
    central_planner, split_planner = (
        planner_for(tiny_bench_data, SIZE, seed=0),
        planner_for(tiny_bench_data, SIZE, seed=0),
    )
    central_losses = [central.step(central_planner.next_plan(), StepClock(CPU)) for _ in range(3)]
    split_losses = [split.step(split_planner.next_plan(), StepClock(CPU)) for _ in range(3)]
    assert central_losses == pytest.approx(split_losses, rel=1e-5)
    torch.testing.assert_close(
        list(split.server.decoder.parameters()), list(central.net.decoder.parameters()), rtol=1e-4, atol=1e-6
    )
