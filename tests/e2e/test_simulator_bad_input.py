"""End to end: bad site input stops the run with a message naming the site and the file or folder."""

from __future__ import annotations

import json

import pytest

from splitunet.demo import ensure_partitioned_phantom
from splitunet.deployment import copy_job_with_overrides, default_site_modalities, find_job, prepare_simulator_workspace
from splitunet.party_settings import SETTINGS_FILE_NAME
from splitunet.simulator import find_run_file, run_simulator

pytestmark = pytest.mark.e2e


def test_missing_site_data_folder_is_named(tmp_path):
    parties = ensure_partitioned_phantom(tmp_path / "data", cases=3, shape=(32, 32, 32), seed=5)
    workspace = prepare_simulator_workspace(tmp_path / "sim", parties, default_site_modalities(4), "k")
    settings_file = workspace / "local" / SETTINGS_FILE_NAME
    settings = json.loads(settings_file.read_text())
    missing = tmp_path / "no_such_folder"
    settings["parties"]["site-2"]["data_dir"] = str(missing)
    settings_file.write_text(json.dumps(settings))
    job = copy_job_with_overrides(find_job(), tmp_path / "job", {"num_iterations": 2, "crop_size": [32, 32, 32]})

    run_simulator(job, workspace, list(default_site_modalities(4)), tmp_path / "sim.log", timeout_s=300, echo=False)

    results = json.loads(find_run_file(workspace, "server", "results.json").read_text())
    assert results["status"] == "failed"
    assert "site-2" in results["error"] and str(missing) in results["error"]
    assert not list(workspace.glob("**/*_best.pt"))
