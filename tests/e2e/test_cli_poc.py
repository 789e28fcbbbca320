"""End to end: `splitunet poc` prepares a POC consortium with a site policy, runs the main job, stops everything."""

from __future__ import annotations

import json

import pytest

from splitunet.tools.cli import main
from splitunet.tools.deployment import bundle_root

pytestmark = pytest.mark.e2e


def test_poc_command_runs_the_main_job_under_a_site_policy(tmp_path, capsys):
    workspace = tmp_path / "poc"
    policy = bundle_root() / "poc" / "privacy.json"
    argv = ["poc", "--workspace", str(workspace), "--cases", "4", "--shape", "36", "36", "36", "--iterations", "2"]
    assert main([*argv, "--privacy", f"site-1={policy}", "--timeout", "300"]) == 0
    summary = json.loads((workspace / "results.json").read_text())
    assert summary["flare_status"] == "FINISHED:COMPLETED" and summary["status"] == "completed"
    assert summary["iterations"] == 2 and summary["all_processes_stopped"]
    assert (workspace / "server_run" / "models" / "decoder_last.pt").is_file()
    # site-1's default scope ("standard") noised and cast its activations; the others only ran the job's guard.
    assert {"ClippedGaussianNoise@site-1", "QuantizeFeatures@site-1"} <= set(summary["filters"]["site-1"])
    assert not any(name.startswith("ClippedGaussianNoise") for name in summary["filters"]["site-2"])
    assert "every POC process stopped: True" in capsys.readouterr().out
