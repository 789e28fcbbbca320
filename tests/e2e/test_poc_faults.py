"""End to end in FLARE POC mode: a job aborted by the admin ends as aborted; a site that is lost mid-run fails the run
as soon as FLARE deems it disconnected, long before the task timeout.

One consortium (a server and four sites, as the main job's ``min_clients`` needs) serves both jobs: the abort goes
first, while every site is alive. The lost site is killed outright (its own process and its job process, SIGKILL),
so it never logs out: the server learns of it only from its missing heartbeat. FLARE's kits wait 600 s for that;
the consortium here waits 30 s (``heart_beat_timeout_s``). FLARE's dead-client grace period comes on top: 60 s unless
the job's server config sets ``dead_client_grace_period``; the job here sets 5 s, so the test waits half as long.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from tiny_job import tiny_server_args

from splitunet.tools.demo import ensure_partitioned_phantom
from splitunet.tools.deployment import copy_job_with_overrides, default_site_modalities, find_job
from splitunet.tools.poc import PocConsortium, PocTimeouts

pytestmark = pytest.mark.e2e

SITES = default_site_modalities(4)  # site-1..site-4: flair, t1, t1gd, t2
TASK_TIMEOUT_S = 600
NUM_ITERATIONS = 5000  # never reached: each run is still training when it is aborted or loses a site
SERVER_ARGS = tiny_server_args(
    num_iterations=NUM_ITERATIONS,
    batch_size=1,
    val_every=NUM_ITERATIONS,
    num_val_cases=1,
    log_every=1,
    task_timeout=TASK_TIMEOUT_S,
)
HEART_BEAT_TIMEOUT_S = 30
DEAD_CLIENT_GRACE_S = 5  # FLARE's default is 60 s; a top-level key of the job's config_fed_server.json
LOST_SITE = "site-2"
RUNNING_ITERATION = 3  # the run has trained this many iterations when the fault is injected
DETECTION_BOUND_S = 120  # heartbeat timeout + heartbeat period + the job's grace, with room for two slow cores
JOB_START_S = 120
JOB_END_S = 120

_ITERATION_LINE = re.compile(r"iteration (\d+)/")


def _iterations_logged(poc: PocConsortium, job_id: str) -> int:
    """The last training iteration the server's workflow logged for the job (0 before the first)."""
    reached = 0
    for log in (poc.party_dir("server") / job_id).rglob("log*.txt"):
        try:
            text = log.read_text(errors="replace")
        except OSError:  # rotated or archived meanwhile
            continue
        reached = max([reached, *(int(found) for found in _ITERATION_LINE.findall(text))])
    return reached


def _wait_for_iteration(poc: PocConsortium, job_id: str, iteration: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reached = _iterations_logged(poc, job_id)
        if reached >= iteration:
            return reached
        status = poc.job_meta(job_id).get("status", "")
        assert not status.startswith("FINISHED"), f"job {job_id} ended ({status}) before iteration {iteration}"
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} did not reach iteration {iteration} within {timeout_s}s")


def _with_dead_client_grace(job: Path, grace_s: float) -> Path:
    """``job`` with FLARE's dead-client grace period (read by the server's workflow) set to ``grace_s``."""
    config_path = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(config_path.read_text())
    config["dead_client_grace_period"] = grace_s
    config_path.write_text(json.dumps(config, indent=2))
    return job


def _server_log(run_dir: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted(run_dir.rglob("log*.txt")))


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc_faults")
    parties = ensure_partitioned_phantom(root / "data", cases=4, shape=(32, 32, 32), seed=5)
    job = copy_job_with_overrides(find_job(), root / "job" / "split_unet", SERVER_ARGS)
    job = _with_dead_client_grace(job, DEAD_CLIENT_GRACE_S)
    poc = PocConsortium(
        root / "ws",
        SITES,
        parties,
        "poc-faults-secret",
        timeouts=PocTimeouts(start_s=90, stop_s=45, admin_call_s=30),
        heart_beat_timeout_s=HEART_BEAT_TIMEOUT_S,
    )
    with poc:  # stops everything also when an assertion or timeout below fails
        poc.prepare()
        poc.start()
        yield poc, job


def test_an_admin_abort_ends_the_run_as_aborted(consortium):
    poc, job = consortium
    job_id = poc.submit(job)
    reached = _wait_for_iteration(poc, job_id, RUNNING_ITERATION, JOB_START_S)
    poc.abort(job_id)
    status = poc.wait(job_id, timeout_s=JOB_END_S)
    run_dir = poc.run_dir(job_id, "server")
    results = json.loads((run_dir / "results.json").read_text())
    print(f"aborted at iteration {results['iterations']} (seen {reached}); FLARE job status {status}")
    assert status == "FINISHED:ABORTED"
    assert results["status"] == "aborted", results.get("error")
    assert "error" not in results
    assert reached <= results["iterations"] < NUM_ITERATIONS
    log = _server_log(run_dir)
    assert "run aborted after iteration" in log
    assert "Split-U-Net run stopped" not in log and "FATAL_SYSTEM_ERROR" not in log


def test_a_lost_site_fails_the_run_once_flare_deems_it_disconnected(consortium):
    poc, job = consortium
    job_id = poc.submit(job)
    _wait_for_iteration(poc, job_id, RUNNING_ITERATION, JOB_START_S)
    killed_at = time.monotonic()
    killed = poc.kill_party(LOST_SITE)
    assert any("job process" in name for name in killed), killed  # the site's job process went with it
    status = poc.wait(job_id, timeout_s=DETECTION_BOUND_S + JOB_END_S)
    elapsed = time.monotonic() - killed_at
    results = json.loads((poc.run_dir(job_id, "server") / "results.json").read_text())
    print(
        f"{LOST_SITE} killed at iteration >= {RUNNING_ITERATION}; job ended {status} {elapsed:.0f}s later "
        f"(heart_beat_timeout {HEART_BEAT_TIMEOUT_S}s, dead_client_grace_period {DEAD_CLIENT_GRACE_S}s, task_timeout "
        f"{TASK_TIMEOUT_S}s); error: {results.get('error')}"
    )
    assert results["status"] == "failed"
    assert f"site {LOST_SITE} disconnected" in results["error"]
    assert re.search(r"at iteration \d+", results["error"])
    assert elapsed < DETECTION_BOUND_S < TASK_TIMEOUT_S
