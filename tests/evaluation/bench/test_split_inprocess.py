"""bench.split_inprocess: the real trainers joined by the simulated wire train, time their parts and validate."""

from __future__ import annotations

import math

import pytest
import torch

from splitunet.evaluation.bench.settings import ProblemSize
from splitunet.evaluation.bench.split_inprocess import InProcessSplit
from splitunet.evaluation.bench.step_timing import planner_for
from splitunet.evaluation.bench.timing import StepClock
from splitunet.evaluation.bench.wire import SimulatedWire
from splitunet.wire.protocol import MODALITIES

CPU = torch.device("cpu")
SIZE = ProblemSize("tiny", (32, 32, 32), 1, (4, 4, 8, 8, 16, 4), (0, 1, 2, 3))
CONFIG = SIZE.model_config(learning_rate=5e-3, weight_decay=0.0, seed=0)


@pytest.mark.parametrize("modalities", [MODALITIES, ("t1gd",)])
def test_split_steps_time_every_part_and_validate(tiny_bench_data, modalities):
    split = InProcessSplit(tiny_bench_data, modalities, CONFIG, CPU, "dice_ce", SimulatedWire())
    planner = planner_for(tiny_bench_data, SIZE, seed=0)
    clock = StepClock(CPU)
    loss = split.step(planner.next_plan(), clock)
    parts = clock.finish()
    assert math.isfinite(loss)
    for part in ("site_compute", "server_compute", "serialization", "total"):
        assert parts[part] > 0, part
    assert len(split.last_up) == len(split.last_down) == len(modalities)
    assert split.last_up[0].keys() == split.last_down[0].keys() == set(CONFIG.sent_levels)
    assert all(site.steps_applied == 1 for site in split.sites)
    dice = split.validate(SIZE.crop_size, sw_batch_size=2, overlap=0.0)
    assert set(dice) == {"TC", "WT", "ET", "mean"}
    assert all(0.0 <= value <= 1.0 for value in dice.values())
