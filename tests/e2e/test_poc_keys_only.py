"""End to end in FLARE POC mode: what the server's job store keeps names cases by key only.

A real server archives its run folder (job log, ``results.json``, previews, checkpoints) into FLARE's job store
when a job ends, and FLARE's provisioned sites stream their error logs (``error_log.txt``) there too. Two jobs run
on one consortium: one that completes (one case missing at a site, so a left-out note is logged), then one that
fails on a case a site cannot read. For both, no file of the downloaded server run folder and none of the job
store's files (zips opened) may hold a case ID, a party's data folder or the case-key secret.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from private_grep import find_private, private_strings
from tiny_job import tiny_server_args

from splitunet.data.case_keys import case_key
from splitunet.server.private_details import DETAILS_FILE
from splitunet.tools.demo import ensure_partitioned_phantom
from splitunet.tools.deployment import copy_job_with_overrides, default_site_modalities, find_job
from splitunet.tools.poc import PocConsortium, PocTimeouts

pytestmark = pytest.mark.e2e

SITES = default_site_modalities(4)  # site-1..site-4: flair, t1, t1gd, t2
SECRET = "keys-only-poc-secret-8e2a4f"
JOB_TIMEOUT_S = 150


def _job_store(server_dir: Path) -> Path:
    """Where the POC server keeps its jobs: its job manager's ``uri_root`` (FLARE's kits: /tmp/nvflare/jobs-storage)."""
    for name in ("resources.json", "resources.json.default"):
        path = server_dir / "local" / name
        if path.is_file():
            for component in json.loads(path.read_text()).get("components", []):
                if component.get("id") == "job_manager":
                    return Path(component["args"]["uri_root"])
    raise AssertionError(f"no job_manager in {server_dir / 'local'}")


@pytest.fixture(scope="module")
def poc_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc_keys")
    parties = ensure_partitioned_phantom(root / "data", cases=4, shape=(32, 32, 32), seed=5)
    (parties / "t1gd" / "BRATS_004.nii.gz").unlink()  # site-3 lacks a case: left out, with a note
    job = copy_job_with_overrides(
        find_job(), root / "job" / "split_unet", tiny_server_args(num_iterations=4, val_every=4, num_val_cases=1)
    )
    poc = PocConsortium(
        root / "ws", SITES, parties, SECRET, timeouts=PocTimeouts(start_s=90, stop_s=45, admin_call_s=30)
    )
    runs = {}
    with poc:
        poc.prepare()
        poc.start()
        for name in ("completed", "corrupt"):
            if name == "corrupt":
                # Not a NIfTI file any more: site-2 fails at setup, naming the case and the file in its own log.
                (parties / "t1" / "BRATS_002.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI volume")
            job_id = poc.submit(job)
            status = poc.wait(job_id, timeout_s=JOB_TIMEOUT_S)
            run_dir = poc.run_dir(job_id, "server")
            runs[name] = {"job_id": job_id, "status": status, "run_dir": run_dir}
        report = poc.stop()
    assert report.all_stopped, report
    server_dir = poc.party_dir("server")
    store = _job_store(server_dir)
    for run in runs.values():
        run["results"] = json.loads((run["run_dir"] / "results.json").read_text())
        run["store"] = store / run["job_id"]
    # Each party's settings hold its own entry only: together they name every data folder.
    private = {}
    for party in poc.parties:
        private.update(private_strings(poc.party_dir(party) / "local" / "splitunet_site.json", parties))
    assert sum("data_dir" in why for why in private.values()) == len(SITES)
    return {"poc": poc, "runs": runs, "private": private}


def test_the_completed_job_names_cases_by_key(poc_runs):
    run = poc_runs["runs"]["completed"]
    assert run["status"] == "FINISHED:COMPLETED" and run["results"]["status"] == "completed", run["results"]
    [key] = run["results"]["val_cases"]
    assert key in {case_key(f"BRATS_{n:03d}", SECRET) for n in range(1, 4)}
    assert list(run["results"]["predictions"]) == [key]
    assert (run["run_dir"] / "predictions" / f"{key}.nii.gz").is_file()
    log = (run["run_dir"] / "log.txt").read_text()
    assert f"case key {case_key('BRATS_004', SECRET)} is missing at site-3 (t1gd)" in log


def test_the_failed_job_names_the_site_and_case_key_only(poc_runs):
    run = poc_runs["runs"]["corrupt"]
    error = run["results"]["error"]
    assert run["results"]["status"] == "failed"
    assert f"site-2: SplitUNetDataError (case key {case_key('BRATS_002', SECRET)}); details in site-2's log" in error
    site_log = (poc_runs["poc"].party_dir("site-2") / run["job_id"] / "log.txt").read_text()
    assert "BRATS_002" in site_log  # the full message stayed at the site


@pytest.mark.parametrize("job", ["completed", "corrupt"])
def test_no_case_id_path_or_secret_in_the_run_folder_or_job_store(poc_runs, job):
    run = poc_runs["runs"][job]
    assert find_private(run["run_dir"], poc_runs["private"]) == []
    assert run["store"].is_dir(), f"job {run['job_id']} is not in the job store {run['store'].parent}"
    stored = sorted(path.name for path in run["store"].iterdir())
    assert "workspace" in stored, stored  # the archived server run folder
    assert find_private(run["store"], poc_runs["private"]) == []


def test_the_label_holder_keeps_the_details_in_its_local_folder(poc_runs):
    details = poc_runs["poc"].party_dir("server") / "local" / DETAILS_FILE
    assert "(case BRATS_004) is missing at site-3" in details.read_text()
