"""End to end: defended job variants in the simulator; the filters run at every site on every iteration."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from audited_run import AUDITED_ITERATIONS
from tiny_job import TINY_SERVER_ARGS

from splitunet.errors import SplitUNetConfigError
from splitunet.tools.demo import DemoSettings, run_demo
from splitunet.tools.deployment import find_job

pytestmark = pytest.mark.e2e

TINY = TINY_SERVER_ARGS
CALL_LINE = re.compile(
    r"ClippedGaussianNoise call (\d+) \((site-\d) -> [^,]+, splitunet_activations, (iteration (\d+)|inference)\)"
)


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("noise")
    settings = DemoSettings(
        cases=6,
        shape=(40, 40, 40),
        seed=3,
        server_args=TINY,
        filter_args={"ClippedGaussianNoise": {"seed": 0}},
        capture_iterations=(1, 2),
        timeout_s=600,
    )
    summary = run_demo(workspace, settings, job_dir=find_job("split_unet_noise"))
    return workspace, summary


def test_noise_filter_ran_at_every_site_on_every_iteration(noise_run):
    workspace, summary = noise_run
    server_results = json.loads(Path(summary["server_results"]).read_text())
    for site in summary["sites"]:
        log = (workspace / "simulator" / site / "log.txt").read_text()
        calls = [match for match in CALL_LINE.finditer(log)]
        assert calls and all(match.group(2) == site for match in calls)
        # The counter goes 1, 2, 3, ... without gaps, and every training iteration is among the calls.
        assert [int(match.group(1)) for match in calls] == list(range(1, len(calls) + 1))
        iterations = {int(match.group(4)) for match in calls if match.group(4)}
        assert iterations == set(range(1, TINY["num_iterations"] + 1))
        # What the server received says the same: every activation DXO from this site went through the filter.
        assert server_results["filters"][site][f"ClippedGaussianNoise@{site}"]["calls"] == len(calls)


def test_defended_training_still_reduces_the_loss(noise_run):
    _, summary = noise_run
    curve = np.array(json.loads(Path(summary["server_results"]).read_text())["loss_curve"])
    assert np.isfinite(curve).all()
    assert curve[-4:].mean() < curve[:4].mean()


def test_blocked_level_with_a_decoder_that_expects_it_stops_at_setup_naming_the_site(tmp_path):
    settings = DemoSettings(
        cases=4, shape=(36, 36, 36), seed=5, server_args={**TINY, "skip_levels": [0, 1, 2, 3]}, timeout_s=300
    )
    with pytest.raises(SplitUNetConfigError) as error:
        run_demo(tmp_path, settings, job_dir=find_job("split_unet_no_x0"))
    message = str(error.value)
    assert "site-1 (flair) never sends skip level(s) ['x0']" in message
    assert "skip_levels [1, 2, 3]" in message
    results = json.loads(next((tmp_path / "simulator").glob("server/*/results.json")).read_text())
    assert results["status"] == "failed" and results["iterations"] == 0


def test_blocked_level_with_a_matching_decoder_trains_without_it(audited_no_x0_run):
    summary = json.loads((audited_no_x0_run / "results.json").read_text())
    server_results = json.loads(Path(summary["server_results"]).read_text())
    assert server_results["status"] == "completed" and server_results["iterations"] == AUDITED_ITERATIONS
    assert server_results["model"]["skip_levels"] == [1, 2, 3]
    for site in summary["sites"]:
        # The job asks for no x0, so the policy had nothing to withhold; it still ran on every step.
        record = server_results["filters"][site][f"BlockSkipLevels@{site}"]
        assert record["last"]["blocks"] == ["x0"] and record["last"]["withheld"] == []
        assert record["calls"] >= AUDITED_ITERATIONS


def test_a_guard_that_refuses_a_release_stops_the_run_with_its_reason(tmp_path):
    settings = DemoSettings(
        cases=4,
        shape=(36, 36, 36),
        seed=5,
        server_args={**TINY, "num_iterations": 4},
        filter_args={"FeatureGuard": {"max_bytes": 1000}},
        timeout_s=300,
    )
    with pytest.raises(SplitUNetConfigError) as error:
        run_demo(tmp_path, settings)
    message = str(error.value)
    assert re.search(r"site site-\d failed task split_step at iteration 1: FeatureGuard \(site-\d -> ", message)
    assert "bytes exceed max_bytes 1000" in message


def test_server_captures_the_noisy_activations_and_the_gradients_it_sends(noise_run):
    from splitunet.checkpoint import load_checkpoint

    _, summary = noise_run
    captures = Path(summary["server_results"]).parent / "captures"
    for site in summary["sites"]:
        activations = sorted((captures / "splitunet_activations" / site).glob("iteration_*.pt"))
        gradients = sorted((captures / "splitunet_gradients" / site).glob("iteration_*.pt"))
        # Iteration 1's task carries no gradients; iteration 2's carries those of iteration 1.
        assert [p.name for p in activations] == ["iteration_000001.pt", "iteration_000002.pt"]
        assert [p.name for p in gradients] == ["iteration_000002.pt"]
        record = load_checkpoint(activations[0])
        assert record["site"] == site and record["plan"]["size"] == TINY["crop_size"]
        assert [r["filter"] for r in record["filter_trail"]][:1] == ["ClippedGaussianNoise"]
        assert set(record["features"]) == {"x0", "x1", "x2", "x3", "x4"}
