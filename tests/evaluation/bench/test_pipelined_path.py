"""`splitunet bench --pipelined`: the simulator path run again with ``pipeline_delay`` 1, beside the lock-step one."""

from __future__ import annotations

import pytest

from splitunet.evaluation.bench import flare_runs
from splitunet.evaluation.bench.settings import BenchSettings
from splitunet.tools.cli import _bench_command, build_parser


class _Stop(Exception):
    """Raised by the stand-in for the simulator once it has seen what it was asked to run."""


def _settings(tmp_path, **kwargs):
    return BenchSettings.create(tmp_path, quick=True, device="cpu", **kwargs)


def test_the_flag_reaches_the_settings_and_the_report_command(tmp_path):
    args = build_parser().parse_args(["bench", "--out", str(tmp_path), "--quick", "--pipelined"])
    assert args.pipelined and "--pipelined" in _bench_command(args)
    assert _settings(tmp_path, pipelined=True).to_dict()["pipelined"] is True
    assert _settings(tmp_path).pipelined is False
    # Without FLARE there is no simulator to pipeline.
    assert _settings(tmp_path, pipelined=True, flare=False).pipelined is False


@pytest.mark.parametrize("delay", [0, 1])
def test_the_simulator_path_runs_the_main_job_with_the_delay_asked_for(tmp_path, monkeypatch, delay):
    seen = {}

    def run_demo(workspace, demo, data_dir=None):
        seen.update(workspace=workspace, server_args=demo.server_args)
        raise _Stop

    monkeypatch.setattr("splitunet.tools.demo.run_demo", run_demo)
    settings = _settings(tmp_path)

    class Data:
        data_dir = tmp_path / "data"

    with pytest.raises(_Stop):
        flare_runs.run_simulator_path(tmp_path, Data(), settings.reference, settings, pipeline_delay=delay)
    assert seen["server_args"].get("pipeline_delay", 0) == delay
    lock_step = flare_runs.flare_server_args(settings.reference, settings)
    assert {k: v for k, v in seen["server_args"].items() if k != "pipeline_delay"} == lock_step
    assert seen["workspace"].name == ("simulator_pipelined_run" if delay else "simulator_run")
