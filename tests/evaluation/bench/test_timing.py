"""bench.timing: parts of a step, warm-up dropped, means."""

from __future__ import annotations

import time

import pytest
import torch

from splitunet.evaluation.bench.timing import StepClock, StepTimes


def test_step_clock_sums_parts_and_keeps_the_rest_as_other():
    clock = StepClock(torch.device("cpu"))
    with clock.part("a"):
        time.sleep(0.01)
    with clock.part("a"):
        time.sleep(0.01)
    clock.add("b", 0.5)
    parts = clock.finish()
    assert parts["a"] >= 0.02
    assert parts["b"] == 0.5
    assert parts["other"] >= 0.0
    # "b" was measured elsewhere, so the wall total may be below the parts' sum; "other" never goes negative.
    assert parts["total"] >= parts["a"]


def test_step_times_drop_warmup_and_average():
    times = StepTimes(warmup=1)
    times.record({"x": 10.0, "total": 10.0})
    times.record({"x": 1.0, "total": 2.0})
    times.record({"x": 3.0, "y": 2.0, "total": 6.0})
    mean = times.mean()
    assert mean["x"] == pytest.approx(2.0)
    assert mean["y"] == pytest.approx(1.0)  # absent in one timed step: counts as 0 there
    assert mean["total"] == pytest.approx(4.0)
    assert mean["total_median"] == pytest.approx(4.0)
    assert mean["timed_steps"] == 2


def test_no_timed_step_is_an_error():
    times = StepTimes(warmup=2)
    times.record({"total": 1.0})
    with pytest.raises(ValueError, match="no timed step"):
        times.mean()
    with pytest.raises(ValueError):
        StepTimes(warmup=-1)
