"""The U-shaped job in the FLARE simulator on phantom hospitals: data, workspace, run, ``results.json``.

The data and the workspace are those of the FedAvg baseline (:mod:`splitunet.horizontal.demo`): one phantom data
set per hospital (``<data_dir>/hospital-1``, ...; MSD Task01 layout, every modality and the labels), one entry per
hospital in the workspace's site settings and the bundle's allow-list (both written by
:func:`splitunet.tools.hospital_workspace.prepare_hospital_workspace`). Runs of both on the same ``data_dir`` train
and validate on the same patients: both hold out, per hospital, the cases of the same seeded split
(:func:`splitunet.server.cases.split_cases` and :func:`splitunet.u_shape.hospital_trainer.split_hospital_cases`
draw the same permutation of the sorted case IDs) when given the same ``seed`` and ``num_val_cases``.

The summary, ``<workspace>/results.json``, has the keys of ``run_fedavg_demo``'s where they mean the same (``job``,
``dice`` pooled over every hospital's held-out cases, ``iterations``, ``rounds``, ``hospitals``, ``simulator_log``,
``elapsed_s``), plus the server's record (``wire``, ``history``, ``drift_correction``) and the bytes per training
iteration the controller counted.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.compute.devices import THREADS_ENV_VAR
from splitunet.errors import SplitUNetConfigError
from splitunet.horizontal.demo import ensure_hospital_phantoms, pooled_scores
from splitunet.tools.deployment import add_wire_audit, copy_job_with_overrides, find_job
from splitunet.tools.hospital_workspace import prepare_hospital_workspace
from splitunet.tools.simulator import completed_server_results, run_simulator
from splitunet.u_shape.protocol import UTaskName

__all__ = [
    "U_SHAPE_JOB_NAME",
    "UShapeDemoSettings",
    "add_setup_audit",
    "wire_bytes_per_iteration",
    "run_u_shape_demo",
]

U_SHAPE_JOB_NAME = "u_shape_unet"
# The round trips of training: the setup and validation ones are not per iteration.
TRAINING_TASKS = (UTaskName.FORWARD, UTaskName.TAIL, UTaskName.COLLECT)
# What the hospitals send about their crops each iteration (x0, dL/du2); the weights of COLLECT are per round.
ACTIVATION_TASKS = (UTaskName.FORWARD, UTaskName.TAIL)
# The controller's default (UShapeSettings), used when server_args do not set it.
_DEFAULT_NUM_VAL_CASES = 1


class UShapeDemoSettings:
    """Size of a U-shaped simulator run.

    Args:
        hospitals: how many hospitals (simulator clients ``hospital-1``, ...).
        cases: phantom cases per hospital.
        shape: phantom volume shape.
        seed: phantom seed; hospital ``h`` draws its patients from ``seed + h`` (as ``FedAvgDemoSettings``).
        server_args: U-shape workflow arguments to set (``num_rounds``, ``iterations_per_round``, ``features``,
            ``crop_size``, ``num_val_cases``, ``drift_correction``, ``seed``, ...).
        client_args: hospital executor arguments to set (``device``, ``num_threads``).
        threads_per_hospital: torch threads of each hospital (they compute at the same time).
        wire_audit: every party records a digest of every payload it sends and receives (``audit/wire_*.jsonl`` in
            its run folder), setup task included.
        timeout_s: the simulator run's time limit.
    """

    def __init__(
        self,
        hospitals: int = 2,
        cases: int = 8,
        shape: Sequence[int] = (64, 64, 64),
        seed: int = 0,
        server_args: Mapping | None = None,
        client_args: Mapping | None = None,
        threads_per_hospital: int = 1,
        wire_audit: bool = False,
        timeout_s: float = 1800.0,
    ):
        if hospitals < 1:
            raise SplitUNetConfigError(f"hospitals must be >= 1, got {hospitals}")
        self.hospitals = hospitals
        self.cases = cases
        self.shape = tuple(shape)
        self.seed = seed
        self.server_args = dict(server_args or {})
        self.client_args = dict(client_args or {})
        self.threads_per_hospital = threads_per_hospital
        self.wire_audit = bool(wire_audit)
        self.timeout_s = timeout_s

    @property
    def names(self) -> list[str]:
        """The hospitals' client names (as ``FedAvgDemoSettings.names``: the data folders are shared)."""
        return [f"hospital-{index + 1}" for index in range(self.hospitals)]


def add_setup_audit(job_dir: str | Path, folder: str = "audit") -> None:
    """Audit the U-shape's setup task too: :func:`add_wire_audit` covers the filtered tasks, setup has no chain."""
    entry = {"path": "splitunet.filters.WireAudit", "args": {"folder": folder}}
    for path in sorted(Path(job_dir).glob("*/config/config_fed_*.json")):
        config = json.loads(path.read_text())
        for chain_name in ("task_data_filters", "task_result_filters"):
            config.setdefault(chain_name, []).append({"tasks": [UTaskName.SETUP], "filters": [dict(entry)]})
        write_json_atomic(config, path)


def wire_bytes_per_iteration(wire: Mapping[str, Mapping[str, int]] | None, iterations: int) -> dict | None:
    """Tensor bytes of training per iteration, all hospitals together, from the controller's ``wire`` record.

    Returns:
        ``{"up", "down"}``: every training round trip (``u_forward``, ``u_tail``, ``u_collect``; down as handed to
        FLARE, up as received after every filter) over the iterations; ``activations_up``: what the hospitals send
        about their crops (``x0`` and ``dL/du2``), the counterpart of the vertical job's
        ``activation_bytes_per_iteration``. ``None`` without a record or an iteration.
    """
    if not wire or not iterations:
        return None
    up = sum(wire.get(task, {}).get("up_bytes", 0) for task in TRAINING_TASKS)
    down = sum(wire.get(task, {}).get("down_bytes", 0) for task in TRAINING_TASKS)
    activations = sum(wire.get(task, {}).get("up_bytes", 0) for task in ACTIVATION_TASKS)
    return {"up": up / iterations, "down": down / iterations, "activations_up": activations / iterations}


def run_u_shape_demo(
    workspace: str | Path,
    settings: UShapeDemoSettings | None = None,
    data_dir: str | Path | None = None,
    job_dir: str | Path | None = None,
) -> dict:
    """Run the U-shaped job on phantom hospitals in the FLARE simulator; write ``<workspace>/results.json``.

    Args:
        workspace: folder of this run (data, simulator workspace, job copy, log, results).
        settings: size of the run.
        data_dir: where the hospitals' phantom datasets live (default ``<workspace>/data``); existing ones
            (``<data_dir>/hospital-1/dataset.json``, ...) are used as they are.
        job_dir: the job folder (default the bundle's ``jobs/u_shape_unet``).

    Returns:
        the summary written to ``results.json``: ``dice`` (pooled over every hospital's held-out cases at the last
        validation), ``rounds``, ``iterations`` (Adam steps of each head, tail and of the middle), ``hospitals``
        (per hospital: ``dice``, ``train_cases``, ``val_cases``), ``history``, ``loss_curve``, ``wire``,
        ``wire_bytes_per_iteration``, ``activation_bytes_per_iteration``, ``drift_correction``, ``server_results``,
        the simulator's log and exit code, ``elapsed_s``.

    Raises:
        SplitUNetConfigError: the run did not complete, or a hospital's Dice is missing (the message names the log).
    """
    settings = settings or UShapeDemoSettings()
    workspace = Path(workspace).resolve()
    data_dir = Path(data_dir).resolve() if data_dir else workspace / "data"
    started = time.perf_counter()
    hospital_dirs = ensure_hospital_phantoms(data_dir, settings)
    sim_workspace = workspace / "simulator"
    if sim_workspace.exists():
        shutil.rmtree(sim_workspace)  # a fresh run: stale results must not pass for new ones
    prepare_hospital_workspace(sim_workspace, hospital_dirs)
    job_dir = Path(job_dir) if job_dir else find_job(U_SHAPE_JOB_NAME)
    job = copy_job_with_overrides(
        job_dir, workspace / "job" / job_dir.name, settings.server_args, settings.client_args or None
    )
    if settings.wire_audit:
        add_wire_audit(job)
        add_setup_audit(job)
    log_file = workspace / "simulator.log"
    return_code = run_simulator(
        job,
        sim_workspace,
        settings.names,
        log_file,
        timeout_s=settings.timeout_s,
        env={THREADS_ENV_VAR: str(settings.threads_per_hospital)},
        echo=False,
    )
    results_path, results = completed_server_results(sim_workspace, return_code, log_file)
    dice = results.get("dice") or {}
    missing = [name for name in settings.names if not dice.get(name)]
    if missing:
        raise SplitUNetConfigError(f"no Dice from {missing} (simulator exit code {return_code}); see {log_file}")
    num_val = int(settings.server_args.get("num_val_cases", _DEFAULT_NUM_VAL_CASES))
    train_counts = results.get("hospitals") or {}
    hd95 = results.get("hd95") or {}
    hospitals = {
        name: {"dice": dice[name], "hd95": hd95.get(name), "train_cases": train_counts.get(name), "val_cases": num_val}
        for name in settings.names
    }
    iterations = results.get("iterations")
    per_iteration = wire_bytes_per_iteration(results.get("wire"), iterations)
    summary = {
        "job": job_dir.name,
        "dice": pooled_scores(hospitals),
        "hd95": pooled_scores(hospitals, "hd95"),
        "iterations": iterations,
        "rounds": results.get("rounds"),
        "hospitals": hospitals,
        "history": results.get("history"),
        "loss_curve": results.get("loss_curve"),
        "drift_correction": results.get("drift_correction"),
        "wire": results.get("wire"),
        "wire_bytes_per_iteration": per_iteration,
        "activation_bytes_per_iteration": per_iteration["activations_up"] if per_iteration else None,
        "server_results": str(results_path),
        "simulator_log": str(log_file),
        "simulator_exit_code": return_code,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(summary, workspace / "results.json")
    return summary


if __name__ == "__main__":  # pragma: no cover - a run at the defaults: python3 -m splitunet.u_shape.demo [WORKSPACE]
    import sys

    print(json.dumps(run_u_shape_demo(sys.argv[1] if len(sys.argv) > 1 else "u_shape_demo"), indent=2))
