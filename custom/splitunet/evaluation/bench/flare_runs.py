"""The split step through FLARE: the main job in the simulator and in POC mode, sized as the in-process arms.

Both reuse the bundle's own runners (:func:`splitunet.tools.demo.run_demo`,
:func:`splitunet.tools.poc.run_job.run_job_in_poc`)
on the benchmark's data, so the job, its filters and its FLARE settings are the shipped ones; only the size
(iterations, crop, features, batch) is overridden. nvflare is imported here only, when a FLARE path runs.
The controller reports its mean time per iteration split into site compute (slowest site), server compute
and the rest of the round trip (waiting and transfer, which includes serialization and FLARE's messaging); with
``flare_warmup_iterations`` the means are taken over the later iterations only (:mod:`.flare_steps`). A POC run
can be placed off loopback (:class:`PocPlacement`): the benchmark's rate-limited links put every party in a
network namespace of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import splitunet
from splitunet.evaluation.bench.flare_steps import read_step_series, timed_step_means
from splitunet.evaluation.bench.job_defaults import main_job_dir
from splitunet.evaluation.bench.loopback import LOOPBACK_HOST
from splitunet.evaluation.bench.phantom_data import BenchData
from splitunet.evaluation.bench.settings import BenchSettings, ProblemSize
from splitunet.wire.protocol import MODALITIES

__all__ = ["run_simulator_path", "run_poc_path", "flare_server_args", "flare_client_args", "PocPlacement"]

# Bound, in seconds, for the POC server and sites to start and connect.
_POC_START_S = 300.0


@dataclass(frozen=True)
class PocPlacement:
    """Where a POC run's processes live.

    Attributes:
        folder: the run's folder under the benchmark's output.
        host: the server's address (the harness and its admin client run where it is reachable).
        harness_prefix: command prefix of the harness' interpreter (e.g. ``ip netns exec <server namespace>``).
        party_prefixes: party -> command prefix of its process (e.g. ``ip netns exec <site namespace>``).
    """

    folder: str = "poc_run"
    host: str = LOOPBACK_HOST
    harness_prefix: Sequence[str] = ()
    party_prefixes: Mapping[str, Sequence[str]] = field(default_factory=dict)


def flare_server_args(problem: ProblemSize, settings: BenchSettings, pipeline_delay: int = 0) -> dict:
    """Workflow overrides: the problem size, the iteration count, one validation (at the end, on one case), and
    ``pipeline_delay`` where it is not lock-step's 0."""
    iterations = settings.flare_iterations
    delay = {"pipeline_delay": pipeline_delay} if pipeline_delay else {}
    return {
        **delay,
        "num_iterations": iterations,
        "val_every": iterations,
        "num_val_cases": 1,
        "batch_size": problem.batch_size,
        "crop_size": list(problem.crop_size),
        "features": list(problem.features),
        "skip_levels": list(problem.skip_levels),
        "seed": settings.seed,
        "log_every": max(1, iterations // 4),
        "amp": settings.amp,
    }


def flare_client_args(settings: BenchSettings) -> dict:
    """Executor overrides: the sites compute as the in-process arms do (``--amp``)."""
    return {"amp": settings.amp}


def _figures(results: dict, elapsed_s: float, run_dir: Path, warmup: int) -> dict:
    timing = results.get("timing_per_iteration_s") or {}
    if not timing:
        raise RuntimeError(f"the run reported no timing (status {results.get('status')}: {results.get('error')})")
    parts = {name: float(value) for name, value in timing.items()}
    parts["total"] = sum(parts.values())
    timed = {}
    if warmup:
        series = read_step_series(run_dir)
        means = timed_step_means(series, warmup) if series else None
        if means is None:
            timed = {"warmup_note": f"no per-step scalars in {run_dir}/tb_events: means over every iteration"}
        else:
            # The controller's means over every iteration stay beside the timed ones.
            timed = {"warmup_iterations": warmup, "all_iterations_step_time_s": parts, **means}
            parts = means["step_time_s"]
    return {
        "iterations": int(results["iterations"]),
        **timed,
        "step_time_s": parts,
        "activation_bytes_per_iteration": float(results["activation_bytes_per_iteration"]),
        # Part of waiting/transfer: from scheduling a step's tasks until the first and the last site took its own.
        "task_dispatch_s": results.get("task_dispatch_per_iteration_s"),
        "dice": results.get("dice"),
        "elapsed_s": elapsed_s,
    }


def run_simulator_path(
    out_dir: Path, data: BenchData, problem: ProblemSize, settings: BenchSettings, pipeline_delay: int = 0
) -> dict:
    """Run the main job in the FLARE simulator (4 sites, one thread each) and return its per-iteration figures.

    With ``pipeline_delay`` 1 the sites encode the next step while the server runs this one; the controller then
    records each step's parts so that they still add up to its time per iteration (docs/design.md, "Pipelined
    steps"), and the run goes to its own folder.
    """
    from splitunet.tools.demo import DemoSettings, run_demo

    server_args = flare_server_args(problem, settings, pipeline_delay)
    demo = DemoSettings(
        cases=settings.cases,
        shape=settings.volume_shape,
        seed=settings.seed,
        server_args=server_args,
        client_args=flare_client_args(settings),
        timeout_s=settings.flare_timeout_s,
    )
    start = time.perf_counter()
    folder = "simulator_run" if not pipeline_delay else "simulator_pipelined_run"
    summary = run_demo(Path(out_dir) / folder, demo, data_dir=data.data_dir)
    results_path = Path(summary["server_results"])
    return _figures(
        json.loads(results_path.read_text()),
        time.perf_counter() - start,
        results_path.parent,
        settings.flare_warmup_iterations,
    )


def _poc_child(arguments: str) -> None:
    """Entry of the fresh interpreter that runs :func:`run_job_in_poc` (see :func:`run_poc_path`)."""
    from splitunet.tools.deployment import default_site_modalities
    from splitunet.tools.poc.run_job import run_job_in_poc
    from splitunet.tools.poc.timeouts import PocTimeouts

    args = json.loads(arguments)
    run_job_in_poc(
        args["workspace"],
        args["job"],
        default_site_modalities(len(MODALITIES)),
        args["parties"],
        args["secret"],
        {},
        job_timeout_s=args["job_timeout_s"],
        # Five processes starting at once on a busy two-core machine were seen to need more than the default.
        timeouts=PocTimeouts(start_s=_POC_START_S, admin_call_s=_POC_START_S / 2),
        host=args["host"],
        party_prefixes=args["party_prefixes"],
    )


def run_poc_path(
    out_dir: Path,
    data: BenchData,
    problem: ProblemSize,
    settings: BenchSettings,
    placement: PocPlacement | None = None,
    pipeline_delay: int = 0,
) -> dict:
    """Run the main job in a fresh POC consortium (mTLS, one process per party), then stop it.

    By default every party is on loopback; ``placement`` puts them elsewhere (see :class:`PocPlacement`).
    ``pipeline_delay`` 1 runs the job pipelined (as :func:`run_simulator_path`).

    The harness (and its admin client) runs in a fresh interpreter: in the bench's own process the in-process arms
    have used FLARE's serialization (FOBS with the tensor decomposer), after which the admin login was seen to go out
    as a stream message the server refuses ("unauthenticated msg ... missing client name"), so no site ever showed
    as connected. The harness writes its summary to ``<workspace>/results.json``, read here.
    """
    from splitunet.tools.deployment import copy_job_with_overrides

    placement = placement or PocPlacement()
    workspace = (Path(out_dir) / placement.folder).resolve()
    job = copy_job_with_overrides(
        main_job_dir(),
        workspace / "job" / "split_unet",
        flare_server_args(problem, settings, pipeline_delay),
        flare_client_args(settings),
    )
    summary_path = workspace / "results.json"
    summary_path.unlink(missing_ok=True)
    arguments = {
        "workspace": str(workspace),
        "job": str(job),
        "parties": str(data.parties),
        "secret": data.secret,
        "job_timeout_s": settings.flare_timeout_s,
        "host": placement.host,
        "party_prefixes": {party: list(prefix) for party, prefix in placement.party_prefixes.items()},
    }
    code = f"from {__name__} import _poc_child; import sys; _poc_child(sys.argv[1])"
    env = dict(os.environ)
    # The child must import this same splitunet, whether it is installed or only on this process's path.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(splitunet.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    child = subprocess.run(
        [*placement.harness_prefix, sys.executable, "-c", code, json.dumps(arguments)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if child.returncode != 0 or not summary_path.is_file():
        tail = "\n".join(child.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the POC harness exited with code {child.returncode}: {tail}")
    summary = json.loads(summary_path.read_text())
    if summary["status"] != "completed":
        raise RuntimeError(f"POC job ended {summary['flare_status']}/{summary['status']}: {summary.get('error')}")
    server_run = Path(summary["server_run"])
    results = json.loads((server_run / "results.json").read_text())
    figures = _figures(results, elapsed, server_run, settings.flare_warmup_iterations)
    figures["all_processes_stopped"] = summary["all_processes_stopped"]
    return figures
