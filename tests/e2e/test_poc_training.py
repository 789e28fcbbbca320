"""End to end in FLARE POC mode: a real server and four real site processes on loopback train the main job.

Unlike the simulator, every party runs in its own process from its own provisioned startup kit (mTLS), reads
only its own ``local/`` settings entry, and the job is submitted through the admin API.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import psutil
import pytest
from tiny_job import tiny_server_args

from splitunet.tools.demo import ensure_partitioned_phantom
from splitunet.tools.deployment import ALLOWED_CLASSES, copy_job_with_overrides, default_site_modalities, find_job
from splitunet.tools.poc import LOOPBACK_HOST, PocConsortium, PocTimeouts

pytestmark = pytest.mark.e2e

SITES = default_site_modalities(4)  # site-1..site-4: flair, t1, t1gd, t2
TINY_SERVER_ARGS = tiny_server_args(num_iterations=8, batch_size=1, val_every=8, num_val_cases=1)
JOB_TIMEOUT_S = 150


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE  # is_running() checks pid reuse
    except psutil.NoSuchProcess:
        return False


def _is_job_process(process: psutil.Process) -> bool:
    try:
        return any(module in part for part in process.cmdline() for module in ("worker_process", "runner_process"))
    except psutil.NoSuchProcess:
        return False


def _job_processes(poc: PocConsortium, timeout_s: float = 30.0) -> list[psutil.Process]:
    """The job processes FLARE spawns per party once a job is deployed (they run in sessions of their own)."""
    deadline = time.monotonic() + timeout_s
    found: list[psutil.Process] = []
    while time.monotonic() < deadline and len(found) < len(poc.parties):
        found = [process for process in poc.processes() if _is_job_process(process)]
        time.sleep(0.5)
    return found


@pytest.fixture(scope="module")
def poc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc")
    parties = ensure_partitioned_phantom(root / "data", cases=4, shape=(32, 32, 32), seed=5)
    job = copy_job_with_overrides(find_job(), root / "job" / "split_unet", TINY_SERVER_ARGS)
    poc = PocConsortium(
        root / "ws", SITES, parties, "poc-test-secret", timeouts=PocTimeouts(start_s=90, stop_s=45, admin_call_s=30)
    )
    with poc:  # stops everything also when an assertion or timeout below fails
        poc.prepare()
        poc.start()
        party_processes = poc.processes()
        job_id = poc.submit(job)
        job_processes = _job_processes(poc)
        listening = poc.listening_addresses()
        status = poc.wait(job_id, timeout_s=JOB_TIMEOUT_S)
        run_dirs = {party: poc.run_dir(job_id, party) for party in poc.parties}
        report = poc.stop()
    return {
        "poc": poc,
        "job_id": job_id,
        "status": status,
        "run_dirs": run_dirs,
        "listening": listening,
        "party_processes": party_processes,
        "job_processes": job_processes,
        "report": report,
        "results": json.loads((run_dirs["server"] / "results.json").read_text()),
    }


def test_job_completes_with_finite_dice(poc_run):
    assert poc_run["status"] == "FINISHED:COMPLETED"
    results = poc_run["results"]
    assert results["status"] == "completed", results.get("error")
    assert results["iterations"] == TINY_SERVER_ARGS["num_iterations"]
    assert results["sites"] == SITES
    assert set(results["dice"]) >= {"TC", "WT", "ET"}
    assert all(math.isfinite(results["dice"][region]) for region in ("TC", "WT", "ET"))


def test_loss_curve_written(poc_run):
    curve = np.array(poc_run["results"]["loss_curve"])
    assert len(curve) == TINY_SERVER_ARGS["num_iterations"]
    assert np.isfinite(curve).all()


def test_each_party_reads_only_its_own_settings(poc_run):
    poc = poc_run["poc"]
    for party in poc.parties:
        settings = json.loads((poc.party_dir(party) / "local" / "splitunet_site.json").read_text())
        assert list(settings["parties"]) == [party]
        resources = json.loads((poc.party_dir(party) / "local" / "resources.json").read_text())
        allowed = resources["class_allow_list"]
        assert set(ALLOWED_CLASSES) <= set(allowed) and "splitunet." not in allowed  # exact classes, no prefix
        assert "splitunet.filters.CaptureFeatures" not in allowed  # not an evaluation consortium
        assert resources.get("components"), f"{party} lost FLARE's default components (job launcher)"


def test_checkpoints_only_at_their_owners(poc_run):
    poc, run_dirs = poc_run["poc"], poc_run["run_dirs"]
    encoders = sorted(poc.workspace.rglob("encoder_*.pt"))
    decoders = sorted(poc.workspace.rglob("decoder_*.pt"))
    assert {path.name for path in decoders} == {"decoder_best.pt", "decoder_last.pt"}
    assert all(path.parent == run_dirs["server"] / "models" for path in decoders)
    assert len(encoders) == 2 * len(SITES)
    for site, modality in SITES.items():
        own = {path.name for path in encoders if path.parent == run_dirs[site] / "models"}
        assert own == {f"encoder_{modality}_best.pt", f"encoder_{modality}_last.pt"}
    assert not list(run_dirs["server"].rglob("encoder_*.pt"))


def test_listens_on_loopback_only(poc_run):
    listening = poc_run["listening"]
    assert (LOOPBACK_HOST, poc_run["poc"].port) in listening
    assert {ip for ip, _ in listening} == {LOOPBACK_HOST}


def test_no_process_survives_stop(poc_run):
    poc, report = poc_run["poc"], poc_run["report"]
    assert report.all_stopped and report.graceful, report
    # One parent process per party, and one job process per party while the job ran (FLARE starts those in
    # sessions of their own, so killing the parents' process groups alone would miss them).
    assert len(poc_run["party_processes"]) == len(poc.parties)
    assert len(poc_run["job_processes"]) == len(poc.parties)
    seen = poc_run["party_processes"] + poc_run["job_processes"]
    assert [process.pid for process in seen if _alive(process)] == []
    assert poc.processes() == []
