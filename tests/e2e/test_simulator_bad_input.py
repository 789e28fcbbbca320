"""End to end: bad site input is named instead of crashing deep in training.

What the server keeps names the site and the case by key; the file or folder is named in the log of the party that
holds it (the site's log, the label holder's private details file). A volume not aligned with its label and a
corrupt case are in ``test_simulator_keys_only.py``, which also searches what the server keeps for private strings.
"""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_job import tiny_server_args

from splitunet.data.case_keys import case_key
from splitunet.data.party_settings import SETTINGS_FILE_NAME
from splitunet.tools.demo import ensure_partitioned_phantom
from splitunet.tools.deployment import (
    copy_job_with_overrides,
    default_site_modalities,
    find_job,
    prepare_simulator_workspace,
)
from splitunet.tools.simulator import find_run_file, run_simulator

pytestmark = pytest.mark.e2e
SITES = default_site_modalities(4)
TINY = tiny_server_args(num_iterations=2, val_every=2, num_val_cases=1)


@pytest.fixture(scope="module")
def source_parties(tmp_path_factory):
    return ensure_partitioned_phantom(tmp_path_factory.mktemp("data"), cases=4, shape=(32, 32, 32), seed=5)


@pytest.fixture
def parties(source_parties, tmp_path):
    copy = tmp_path / "parties"
    shutil.copytree(source_parties, copy)
    return copy


def _run(tmp_path, parties, edit_settings=None):
    workspace = prepare_simulator_workspace(tmp_path / "sim", parties, SITES, "k")
    if edit_settings:
        settings_file = workspace / "local" / SETTINGS_FILE_NAME
        settings = json.loads(settings_file.read_text())
        edit_settings(settings["parties"])
        settings_file.write_text(json.dumps(settings))
    job = copy_job_with_overrides(find_job(), tmp_path / "job", TINY)
    log = tmp_path / "sim.log"
    run_simulator(job, workspace, list(SITES), log, timeout_s=300, echo=False)
    results = json.loads(find_run_file(workspace, "server", "results.json").read_text())
    return workspace, results, log.read_text()


def test_missing_site_data_folder_is_named(tmp_path, parties):
    missing = tmp_path / "no_such_folder"
    workspace, results, _ = _run(tmp_path, parties, lambda p: p["site-2"].update(data_dir=str(missing)))
    assert results["status"] == "failed"
    assert "site-2: SplitUNetDataError; details in site-2's log" in results["error"]
    assert str(missing) not in results["error"]  # the site's data path stays at the site
    site_log = "".join(path.read_text() for path in (workspace / "site-2").rglob("log.txt"))
    assert "data folder not found (or not a folder)" in site_log and str(missing) in site_log
    assert not list(workspace.glob("**/*_best.pt"))


def test_case_missing_at_one_site_is_named_and_left_out(tmp_path, parties):
    (parties / "t1gd" / "BRATS_002.nii.gz").unlink()
    _, results, log = _run(tmp_path, parties)
    assert results["status"] == "completed"
    assert results["left_out_cases"] == {"site-3": 1}
    key = case_key("BRATS_002", "k")
    assert f"case key {key} is missing at site-3 (t1gd); left out of training" in log
    assert "BRATS_002" not in log  # the server's log names cases by key
    assert key not in results["val_cases"] and len(results["val_cases"][0]) == len(key)
