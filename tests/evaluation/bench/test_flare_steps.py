"""bench.flare_steps: per-step parts read back from real TensorBoard events, and means without the warm-up."""

from __future__ import annotations

import pytest

from splitunet.evaluation.bench.flare_steps import STEP_SCALARS, read_step_series, timed_step_means

tensorboard = pytest.importorskip("torch.utils.tensorboard")

# Per step: (site compute, server compute, waiting/transfer); the first two steps are slow warm-up.
_STEPS = {1: (9.0, 8.0, 7.0), 2: (5.0, 4.0, 3.0), 3: (1.0, 2.0, 0.5), 4: (1.2, 2.2, 0.7), 5: (1.4, 2.4, 0.9)}


@pytest.fixture
def run_dir(tmp_path):
    """A server run folder whose tb_events hold the controller's scalars, as the job's receiver writes them."""
    writer = tensorboard.SummaryWriter(str(tmp_path / "tb_events" / "simulator_server"))
    for step, values in _STEPS.items():
        writer.add_scalar("loss", 1.0 / step, step)
        for tag, value in zip(STEP_SCALARS.values(), values):
            writer.add_scalar(tag, value, step)
    writer.close()
    return tmp_path


def test_every_step_of_every_part_is_read_back(run_dir):
    series = read_step_series(run_dir)
    assert set(series) == set(STEP_SCALARS)
    for index, part in enumerate(STEP_SCALARS):
        assert series[part] == pytest.approx({step: values[index] for step, values in _STEPS.items()})


def test_means_leave_the_warm_up_out_and_keep_every_total(run_dir):
    timed = timed_step_means(read_step_series(run_dir), warmup=2)
    assert timed["timed_steps"] == [3, 4, 5]
    assert timed["step_time_s"]["site_compute"] == pytest.approx(1.2)
    assert timed["step_time_s"]["total"] == pytest.approx(1.2 + 2.2 + 0.7)
    assert timed["total_per_step_s"] == pytest.approx([sum(values) for values in _STEPS.values()])
    assert timed_step_means(read_step_series(run_dir), warmup=5) is None


def test_a_run_without_events_has_no_series(tmp_path):
    assert read_step_series(tmp_path) is None
