"""End to end: the main job with ``amp`` on at the server and every site, in the simulator.

On a CPU every party says it ignores the option and trains in float32; with CUDA it trains under autocast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_job import tiny_server_args

from splitunet.tools.demo import DemoSettings, run_demo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def amp_run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("amp")
    settings = DemoSettings(
        cases=4,
        shape=(32, 32, 32),
        seed=5,
        server_args=tiny_server_args(num_iterations=8, val_every=8, num_val_cases=1, amp=True),
        client_args={"amp": True},
        timeout_s=600,
    )
    return workspace, run_demo(workspace, settings)


def test_every_party_reports_whether_it_applied_the_option(amp_run):
    workspace, summary = amp_run
    on_gpu = torch.cuda.is_available()
    results = json.loads(Path(summary["server_results"]).read_text())
    assert results["server_compute"]["amp_requested"] is True
    assert results["server_compute"]["amp"] is on_gpu
    expected = "training under bfloat16 autocast" if on_gpu else "amp ignored on this device"
    for site in summary["sites"]:
        log = (workspace / "simulator" / site / "log.txt").read_text()
        assert expected in log, site
    if not on_gpu:
        assert "amp ignored on cpu" in (workspace / "simulator.log").read_text()


def test_the_run_completes_with_finite_loss_and_dice(amp_run):
    _, summary = amp_run
    results = json.loads(Path(summary["server_results"]).read_text())
    assert results["iterations"] == 8
    assert np.isfinite(results["loss_curve"]).all()
    assert all(np.isfinite(value) for value in results["dice"].values())
