"""``splitunet poc``: prepare a POC consortium, run one job in it, keep its results, stop every process."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.tools.poc.consortium import PocConsortium
from splitunet.tools.poc.errors import PocError
from splitunet.tools.poc.kits import LOOPBACK_HOST
from splitunet.tools.poc.timeouts import PocTimeouts

__all__ = ["run_job_in_poc"]


def run_job_in_poc(
    workspace: str | Path,
    job_dir: str | Path,
    site_modalities: Mapping[str, str],
    partition_dir: str | Path,
    case_key_secret: str,
    privacy_policies: Mapping[str, Mapping] | None = None,
    job_timeout_s: float = 3600.0,
    timeouts: PocTimeouts | None = None,
    host: str = LOOPBACK_HOST,
    party_prefixes: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Run ``job_dir`` once in a fresh POC consortium and write ``<workspace>/results.json``.

    The server's run folder (results, decoder checkpoints, TensorBoard events) is copied to
    ``<workspace>/server_run``; each site's encoder stays in its own kit folder. ``host`` and ``party_prefixes``
    place the parties elsewhere than on loopback (see :class:`PocConsortium`).

    Returns:
        the summary written to ``results.json``: FLARE's job status, the run's own results and where things are.

    Raises:
        PocError: if the consortium cannot start, a party dies, or the job outlasts ``job_timeout_s``.
    """
    workspace = Path(workspace).resolve()
    poc = PocConsortium(
        workspace / "consortium",
        site_modalities,
        partition_dir,
        case_key_secret,
        privacy_policies=privacy_policies,
        timeouts=timeouts,
        host=host,
        party_prefixes=party_prefixes,
    )
    with poc:
        print(f"Provisioning a POC consortium with sites {dict(site_modalities)} in {poc.workspace}", flush=True)
        poc.prepare()
        print(f"Starting the server on {poc.host}:{poc.port} and {len(poc.sites)} sites", flush=True)
        poc.start()
        job_id = poc.submit(job_dir)
        print(f"Submitted {job_dir} as job {job_id}; waiting (at most {job_timeout_s:.0f}s)", flush=True)
        status = poc.wait(job_id, timeout_s=job_timeout_s)
        server_run = poc.run_dir(job_id, "server")
        site_runs = {site: str(poc.run_dir(job_id, site)) for site in poc.sites}
        kept = workspace / "server_run"
        if kept.exists():
            shutil.rmtree(kept)
        shutil.copytree(server_run, kept)
    report = poc.last_stop_report
    results_path = kept / "results.json"
    if not results_path.is_file():
        raise PocError(f"job {job_id} ended {status} without a results.json; see {poc.log_files('server')[0]}")
    results = json.loads(results_path.read_text())
    summary = {
        "job_id": job_id,
        "flare_status": status,
        "status": results.get("status"),
        "error": results.get("error"),
        "dice": results.get("dice"),
        "iterations": results.get("iterations"),
        "sites": results.get("sites"),
        "filters": results.get("filters"),
        "server_run": str(kept),
        "site_runs": site_runs,
        "all_processes_stopped": bool(report and report.all_stopped),
    }
    write_json_atomic(summary, workspace / "results.json")
    return summary
