"""End to end in the simulator: what FLARE keeps of the server's run folder names cases by key only.

FLARE archives the server's run folder (log, ``results.json``, previews, checkpoints) into its job store, which
admins download. After a tiny demo run, after a run that fails on a site's corrupt case, and after one that fails on
a volume not aligned with its label, no file of that folder (text or binary) may hold a case ID, a party's data
folder or the case-key secret. The simulator keeps the server's log beside the run folder (``server/log.txt``,
where a real server's job log is inside it), so the whole ``server/`` folder is searched but for the server's own
settings (``local/``, holding the secret) and its startup kit. The full details stay with their owners: the site's
log, the label holder's ``local/`` folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from private_grep import corrupt_voxels, find_private, private_strings
from tiny_job import TINY_DEMO_PHANTOM, TINY_SERVER_ARGS, tiny_server_args

from splitunet.data.case_keys import case_key
from splitunet.data.party_settings import SETTINGS_FILE_NAME
from splitunet.server.private_details import DETAILS_FILE
from splitunet.tools.demo import ensure_partitioned_phantom
from splitunet.tools.deployment import (
    copy_job_with_overrides,
    default_site_modalities,
    find_job,
    prepare_simulator_workspace,
)
from splitunet.tools.simulator import find_run_file, run_simulator

pytestmark = pytest.mark.e2e

SITES = default_site_modalities(4)  # site-1..site-4: flair, t1, t1gd, t2
SECRET = "keys-only-simulator-secret-5d1c"


# The server's own settings (with the case-key secret) and startup kit: never part of a job.
SERVER_OWN = ("local", "startup")


def _server_run_folder(simulator_workspace: Path) -> Path:
    results = find_run_file(simulator_workspace, "server", "results.json")
    assert results is not None, f"the server wrote no results.json under {simulator_workspace}"
    run_folder = simulator_workspace / "server" / "simulate_job"
    assert run_folder in results.parents
    return run_folder


def _server_leaks(run_folder: Path, private: dict) -> list[str]:
    """Private strings in the server's run folder and its logs beside it."""
    return find_private(run_folder.parent, private, skip=SERVER_OWN)


def _failed_run(tmp_path: Path, source: Path, corrupt) -> dict:
    """A tiny training run on a copy of ``source`` changed by ``corrupt(parties)``; its server run folder."""
    parties = tmp_path / "parties"
    shutil.copytree(source, parties)
    corrupt(parties)
    # The server's models/ folder stays in its run folder (no checkpoint_dir), so the grep covers checkpoints.
    workspace = prepare_simulator_workspace(tmp_path / "sim", parties, SITES, SECRET)
    job = copy_job_with_overrides(find_job(), tmp_path / "job", tiny_server_args(num_iterations=2, val_every=2))
    log = tmp_path / "sim.log"
    run_simulator(job, workspace, list(SITES), log, timeout_s=300, echo=False)
    run_folder = _server_run_folder(workspace)
    return {
        "workspace": workspace,
        "run_folder": run_folder,
        "results": json.loads(find_run_file(workspace, "server", "results.json").read_text()),
        "private": private_strings(workspace / "local" / SETTINGS_FILE_NAME, parties),
        "server_log": (run_folder.parent / "log.txt").read_text(),
    }


@pytest.fixture(scope="module")
def source_parties(tmp_path_factory):
    return ensure_partitioned_phantom(tmp_path_factory.mktemp("data"), cases=4, shape=(32, 32, 32), seed=5)


@pytest.fixture(scope="module")
def demo_run(tiny_demo_run):
    workspace, summary = tiny_demo_run  # one run of the main job, shared with the demo test (tests/e2e/conftest.py)
    simulator = workspace / "simulator"
    return {
        "workspace": workspace,
        "summary": summary,
        "run_folder": _server_run_folder(simulator),
        "private": private_strings(simulator / "local" / SETTINGS_FILE_NAME, workspace / "data" / "parties"),
    }


def test_a_demo_run_keeps_no_case_id_path_or_secret_at_the_server(demo_run):
    run_folder = demo_run["run_folder"]
    results = json.loads((run_folder / "results.json").read_text())
    assert results["status"] == "completed"
    secret = (demo_run["workspace"] / "data" / "case_key_secret.txt").read_text().strip()
    keys = results["val_cases"]
    assert len(keys) == TINY_SERVER_ARGS["num_val_cases"]
    assert set(keys) <= {case_key(f"BRATS_{n:03d}", secret) for n in range(1, TINY_DEMO_PHANTOM["cases"] + 1)}
    # Previews of the first held-out cases, each filed under its key.
    assert results["predictions"] and set(results["predictions"]) <= set(keys)
    for key, path in results["predictions"].items():
        assert path == str(run_folder / "predictions" / f"{key}.nii.gz") and Path(path).is_file()
    assert demo_run["summary"]["preview_png"]  # the demo maps the key back with the secret, as a data holder
    assert _server_leaks(run_folder, demo_run["private"]) == []
    # The search finds what is there: the server's own settings hold the secret and the data folders.
    in_settings = find_private(run_folder.parent / "local", demo_run["private"])
    assert any("the case-key secret" in line for line in in_settings)
    assert any("site-1's data_dir" in line for line in in_settings)


def test_a_corrupt_case_at_a_site_is_named_by_key_and_its_details_stay_at_the_site(tmp_path, source_parties):
    def corrupt(parties: Path):
        corrupt_voxels(parties / "t1" / "BRATS_002.nii.gz")  # site-2: read when training or validating
        (parties / "t1gd" / "BRATS_004.nii.gz").unlink()  # site-3: left out, with a note

    run = _failed_run(tmp_path, source_parties, corrupt)
    results = run["results"]
    assert results["status"] == "failed" and results["left_out_cases"] == {"site-3": 1}
    key = case_key("BRATS_002", SECRET)
    assert f"site-2: SplitUNetDataError (case key {key}); details in site-2's log" in results["error"]
    assert f"case key {case_key('BRATS_004', SECRET)} is missing at site-3 (t1gd)" in run["server_log"]
    assert _server_leaks(run["run_folder"], run["private"]) == []
    # The site kept the full message: case ID and file.
    site_log = "".join(path.read_text() for path in (run["workspace"] / "site-2").rglob("log.txt"))
    assert "BRATS_002" in site_log and "not finite" in site_log
    # The label holder's details name the left-out case.
    [details] = list(run["workspace"].rglob(DETAILS_FILE))
    assert run["run_folder"] not in details.parents and "BRATS_004" in details.read_text()


def test_a_volume_not_aligned_with_its_label_is_named_by_key_at_the_server(tmp_path, source_parties):
    def corrupt(parties: Path):
        path = parties / "flair" / "BRATS_003.nii.gz"
        image = nib.load(path)
        shifted = image.affine.copy()
        shifted[:3, 3] += 5.0
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted, image.header), path)

    run = _failed_run(tmp_path, source_parties, corrupt)
    error = run["results"]["error"]
    assert run["results"]["status"] == "failed"
    assert f"[party=site-1, case key={case_key('BRATS_003', SECRET)}]" in error
    assert "not voxel-aligned with the label" in error
    assert f"details in the server's local/{DETAILS_FILE}" in error
    assert _server_leaks(run["run_folder"], run["private"]) == []
    [details] = list(run["workspace"].rglob(DETAILS_FILE))
    text = details.read_text()
    assert "case=BRATS_003" in text and str(run["workspace"].parent / "parties" / "labels" / "BRATS_003.nii.gz") in text
