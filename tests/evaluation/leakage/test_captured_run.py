import json
import shutil

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.leakage import ACTIVATIONS, GRADIENTS, CapturedRun


def test_reads_sites_model_and_captures(captured_workspace):
    workspace, model = captured_workspace
    run = CapturedRun(workspace)
    assert run.sites["site-1"] == "flair" and len(run.sites) == 4
    assert run.model.features == model.features and run.job == "split_unet"
    assert run.iterations(ACTIVATIONS, "site-1") == [1]
    assert run.iterations(GRADIENTS, "site-1") == [2]
    capture = run.capture(ACTIVATIONS, "site-1", 1)
    assert sorted(capture.observed) == [0, 1, 2, 3, 4]
    assert capture.observed[0].shape == (2, 8, 32, 32, 32)
    assert capture.plan["size"] == [32, 32, 32] and len(capture.plan["keys"]) == 2
    assert capture.filter_trail[0]["filter"] == "FeatureGuard"


def test_missing_iteration_names_what_was_captured(workspace):
    with pytest.raises(SplitUNetConfigError, match=r"iteration 5 .*captured: \[1\]"):
        CapturedRun(workspace).capture(ACTIVATIONS, "site-1", 5)


def test_unknown_site(workspace):
    with pytest.raises(SplitUNetConfigError, match="site-9"):
        CapturedRun(workspace).capture(ACTIVATIONS, "site-9", 1)


def test_not_a_workspace(tmp_path):
    with pytest.raises(SplitUNetConfigError, match="results.json not found"):
        CapturedRun(tmp_path)


def test_run_without_captures_says_how_to_make_them(workspace, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workspace / "simulator", copy / "simulator", ignore=shutil.ignore_patterns("captures"))
    server_results = copy / "simulator" / "server" / "simulate_job" / "results.json"
    (copy / "results.json").write_text(
        json.dumps({"server_results": str(server_results), "sites": {"site-1": "flair"}})
    )
    with pytest.raises(SplitUNetConfigError, match="--capture"):
        CapturedRun(copy)


def test_unreadable_capture_is_named(workspace, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workspace / "simulator", copy / "simulator")
    run_dir = copy / "simulator" / "server" / "simulate_job"
    (copy / "results.json").write_text(
        json.dumps({"server_results": str(run_dir / "results.json"), "sites": {"site-1": "flair"}})
    )
    broken = run_dir / "captures" / ACTIVATIONS / "site-1" / "iteration_000001.pt"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(SplitUNetConfigError, match="iteration_000001.pt is unreadable"):
        CapturedRun(copy).capture(ACTIVATIONS, "site-1", 1)
