"""bench.centralized: the 4-channel baselines train and are scored by the server's validation."""

from __future__ import annotations

import math

import pytest
import torch

from splitunet.bench.centralized import CentralizedTrainer
from splitunet.bench.settings import ProblemSize
from splitunet.bench.step_timing import planner_for
from splitunet.bench.timing import StepClock

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
