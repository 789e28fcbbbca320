"""End to end: the main job trains through FLARE tasks in the simulator on a tiny phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_job import TINY_SERVER_ARGS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_run(tiny_demo_run):
    return tiny_demo_run  # one run of the main job, shared with the keys-only test (tests/e2e/conftest.py)


def test_results_hold_dice_and_iterations(demo_run):
    workspace, summary = demo_run
    on_disk = json.loads((workspace / "results.json").read_text())
    assert on_disk["iterations"] == TINY_SERVER_ARGS["num_iterations"]
    assert set(on_disk["dice"]) == {"TC", "WT", "ET"}
    assert all(0.0 <= value <= 1.0 for value in on_disk["dice"].values())
    # HD95 in voxels, at most the 40^3 phantom's diagonal (the score of a region missed entirely).
    assert set(on_disk["hd95"]) == {"TC", "WT", "ET"}
    assert all(0.0 <= value <= 40 * 3**0.5 + 1e-6 for value in on_disk["hd95"].values())
    assert sorted(on_disk["sites"].values()) == ["flair", "t1", "t1gd", "t2"]
    assert Path(on_disk["preview_png"]).is_file()


def test_loss_falls(demo_run):
    workspace, _ = demo_run
    server_results = json.loads(
        Path(json.loads((workspace / "results.json").read_text())["server_results"]).read_text()
    )
    curve = np.array(server_results["loss_curve"])
    assert len(curve) == TINY_SERVER_ARGS["num_iterations"]
    assert np.isfinite(curve).all()
    assert curve[-4:].mean() < curve[:4].mean()


def test_checkpoints_only_at_their_owners(demo_run):
    workspace, summary = demo_run
    simulator, checkpoints = workspace / "simulator", workspace / "checkpoints"
    assert not list(simulator.glob("**/*.pt"))  # kept outside the workspace the simulator wipes
    encoders = sorted(checkpoints.glob("**/encoder_*.pt"))
    decoders = sorted(checkpoints.glob("**/decoder_*.pt"))
    assert decoders and all(path.relative_to(checkpoints).parts[0] == "server" for path in decoders)
    assert {path.name for path in decoders} == {"decoder_best.pt", "decoder_last.pt"}
    # Each site holds exactly its own modality's encoder, best and last; the server holds none.
    by_party = {}
    for path in encoders:
        by_party.setdefault(path.relative_to(checkpoints).parts[0], set()).add(path.name)
    assert "server" not in by_party
    for site, modality in summary["sites"].items():
        assert by_party[site] == {f"encoder_{modality}_best.pt", f"encoder_{modality}_last.pt"}


def test_tensorboard_events_written(demo_run):
    _, summary = demo_run
    assert summary["tensorboard"] is not None
    assert list(Path(summary["tensorboard"]).glob("**/events.out.tfevents.*"))


def test_the_server_sends_gradient_codes_made_on_its_device(demo_run):
    workspace, _ = demo_run
    server_results = json.loads(
        Path(json.loads((workspace / "results.json").read_text())["server_results"]).read_text()
    )
    # The main job's gradient chain starts with the int8 quantizer, so the codes are made before the host copy.
    assert server_results["server_compute"]["gradient_code_bits"] == 8


def test_step_timing_and_task_dispatch_are_reported(demo_run):
    workspace, _ = demo_run
    server_results = json.loads(
        Path(json.loads((workspace / "results.json").read_text())["server_results"]).read_text()
    )
    timing = server_results["timing_per_iteration_s"]
    assert set(timing) == {"site_compute", "server_compute", "waiting_transfer"}
    assert all(value > 0 for value in timing.values())
    dispatch = server_results["task_dispatch_per_iteration_s"]
    # The last site cannot take its task before the first, nor after the whole round trip's wait.
    assert 0 <= dispatch["first_site"] <= dispatch["last_site"] <= timing["site_compute"] + timing["waiting_transfer"]
