"""A tiny simulator run of a job variant with ``WireAudit`` in every chain and the server's capture filter on every
iteration, as the wire-audit and defended-job tests read it (shared through ``tests/e2e/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

from tiny_job import tiny_server_args

from splitunet.tools.demo import DemoSettings, run_demo
from splitunet.tools.deployment import add_wire_audit, copy_job_with_overrides, find_job

AUDITED_ITERATIONS = 6
# A fixed case-key secret fixes which cases train and which crops are drawn, so the measured values repeat.
AUDITED_SECRET = "wire-audit-test-secret"


def audited_run(workspace: Path, job_name: str) -> Path:
    """Run ``job_name`` audited and captured on a 6-case 40^3 phantom in ``workspace``; returns ``workspace``
    (``results.json``, ``simulator/``, ``checkpoints/``, ``data/``)."""
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "case_key_secret.txt").write_text(AUDITED_SECRET)
    job = copy_job_with_overrides(find_job(job_name), workspace / "audited_job" / job_name)
    add_wire_audit(job)
    settings = DemoSettings(
        cases=6,
        shape=(40, 40, 40),
        seed=3,
        server_args=tiny_server_args(num_iterations=AUDITED_ITERATIONS, val_every=AUDITED_ITERATIONS),
        capture_iterations=range(1, AUDITED_ITERATIONS + 1),
        timeout_s=600,
    )
    run_demo(workspace, settings, job_dir=job)
    return workspace
