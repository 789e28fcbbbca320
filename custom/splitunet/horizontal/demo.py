"""The FedAvg baseline in the FLARE simulator on phantom hospitals: data, workspace, run, ``results.json``.

Each simulated hospital gets its own phantom patients (a dataset folder in MSD Task01 layout with every modality and
the labels), its entry in the workspace's site settings and the allow-list the job's classes need
(:func:`splitunet.tools.hospital_workspace.prepare_hospital_workspace`). The summary it writes,
``<workspace>/results.json``, has the keys of ``splitunet demo``'s where they mean the same (``job``, ``dice``,
``iterations``, ``simulator_log``, ...) plus ``rounds`` and one entry per hospital; for the DP-SGD variant
(``fedavg_unet_dp``) also ``dp``: each hospital's epsilon spent, at its delta.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from splitunet.atomic_files import write_json_atomic
from splitunet.compute.devices import THREADS_ENV_VAR
from splitunet.data.phantom import generate_phantom
from splitunet.errors import SplitUNetConfigError
from splitunet.horizontal.executor import RESULTS_FILE
from splitunet.tools.deployment import find_job
from splitunet.tools.hospital_workspace import prepare_hospital_workspace
from splitunet.tools.simulator import find_run_file, run_simulator
from splitunet.wire.protocol import REGIONS

__all__ = [
    "FEDAVG_JOB_NAME",
    "FEDAVG_DP_JOB_NAME",
    "FedAvgDemoSettings",
    "ensure_hospital_phantoms",
    "copy_fedavg_job",
    "run_fedavg_demo",
    "pooled_scores",
]

FEDAVG_JOB_NAME = "fedavg_unet"
FEDAVG_DP_JOB_NAME = "fedavg_unet_dp"
# The persistor's file (FLARE's default name) and GlobalModelEval's results (ValidationJsonGenerator's defaults).
GLOBAL_MODEL_FILE = "FL_global_model.pt"
CROSS_SITE_RESULTS = "cross_val_results.json"


class FedAvgDemoSettings:
    """Size of a FedAvg simulator run.

    Args:
        hospitals: how many hospitals (simulator clients ``hospital-1``, ...).
        cases: phantom cases per hospital.
        shape: phantom volume shape.
        seed: phantom seed; hospital ``h`` draws its patients from ``seed + h`` (every hospital has others).
        server_args: FedAvg workflow arguments to set (``num_rounds``, ``fedprox_mu``, ...).
        client_args: hospital executor arguments to set (``local_iterations``, ``crop_size``, ``features``, ...).
        model_args: the server's model component arguments to set (``features``, ...; must match ``client_args``).
        threads_per_hospital: torch threads of each hospital (they compute at the same time).
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
        model_args: Mapping | None = None,
        threads_per_hospital: int = 1,
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
        self.model_args = dict(model_args or {})
        self.threads_per_hospital = threads_per_hospital
        self.timeout_s = timeout_s

    @property
    def names(self) -> list[str]:
        """The hospitals' client names."""
        return [f"hospital-{index + 1}" for index in range(self.hospitals)]


def ensure_hospital_phantoms(data_dir: str | Path, settings: FedAvgDemoSettings) -> dict[str, Path]:
    """One phantom dataset per hospital (MSD layout) under ``data_dir``, unless already there."""
    folders = {}
    for index, name in enumerate(settings.names):
        folder = Path(data_dir) / name
        if not (folder / "dataset.json").is_file():
            generate_phantom(folder, settings.cases, shape=settings.shape, seed=settings.seed + index, progress=False)
        folders[name] = folder.resolve()
    return folders


def copy_fedavg_job(
    job_dir: str | Path,
    out_dir: str | Path,
    server_args: Mapping | None = None,
    client_args: Mapping | None = None,
    model_args: Mapping | None = None,
) -> Path:
    """Copy the FedAvg job folder, setting arguments of its FedAvg workflow, hospitals' executor and model.

    Only the FedAvg workflow takes ``server_args``: the job's second workflow (GlobalModelEval) has other arguments.
    """
    job_dir, out_dir = Path(job_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(job_dir, out_dir)
    for path in sorted(out_dir.glob("*/config/config_fed_*.json")):
        config = json.loads(path.read_text())
        for workflow in config.get("workflows", []):
            # FLARE's FedAvg or a subclass of it (the DWCS variant's DriftCorrectedFedAvg), by the job's workflow id.
            if workflow.get("id") == "fedavg" or workflow["path"].endswith("FedAvg"):
                workflow.setdefault("args", {}).update(server_args or {})
        for executor in config.get("executors", []):
            executor["executor"].setdefault("args", {}).update(client_args or {})
        for component in config.get("components", []):
            if component["id"] == "model":
                component.setdefault("args", {}).update(model_args or {})
        write_json_atomic(config, path)
    return out_dir


def pooled_scores(hospitals: Mapping[str, Mapping], score: str = "dice") -> dict[str, float] | None:
    """One score over every hospital's held-out cases, from each hospital's ``score`` and ``val_cases``."""
    # Each hospital's score is a mean over its cases, so the mean weighted by held-out cases is the mean over all of
    # them (``score``: "dice" or "hd95").
    scored = {name: entry for name, entry in hospitals.items() if entry.get(score)}
    if not scored:
        return None
    weights = np.array([entry["val_cases"] for entry in scored.values()], dtype=np.float64)
    pooled = {
        region: float(np.average([entry[score][region] for entry in scored.values()], weights=weights))
        for region in REGIONS
    }
    pooled["mean"] = float(np.nanmean([pooled[region] for region in REGIONS]))
    return pooled


def run_fedavg_demo(
    workspace: str | Path,
    settings: FedAvgDemoSettings | None = None,
    job_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> dict:
    """Run the FedAvg job on phantom hospitals in the FLARE simulator; write ``<workspace>/results.json``.

    Args:
        workspace: folder of this run (data, simulator workspace, job copy, log, results).
        settings: size of the run.
        job_dir: the job folder (default the bundle's ``jobs/fedavg_unet``).
        data_dir: where the hospitals' phantom datasets live (default ``<workspace>/data``).

    Returns:
        the summary written to ``results.json``: ``dice`` (the final global model over every hospital's held-out
        cases), ``rounds``, ``iterations`` (local Adam steps of each hospital's model), ``hospitals`` (per hospital:
        ``dice``, ``rounds``, ``iterations``, ``train_cases``, ``val_cases``, ``loss_curve``, ``history``, ``dp``
        and the path of its own ``results.json``), ``global_model``, ``cross_site_val``, the simulator's log and exit
        code; and ``dp``: ``{hospital: {"epsilon", "delta", "projected_epsilon", "steps"}}`` for a DP-SGD job, else
        ``None``.

    Raises:
        SplitUNetConfigError: the run timed out, or a hospital did not report the final global model's Dice (the
            message names the log).
    """
    settings = settings or FedAvgDemoSettings()
    workspace = Path(workspace).resolve()
    data_dir = Path(data_dir).resolve() if data_dir else workspace / "data"
    started = time.perf_counter()
    hospital_dirs = ensure_hospital_phantoms(data_dir, settings)
    sim_workspace = workspace / "simulator"
    if sim_workspace.exists():
        shutil.rmtree(sim_workspace)  # a fresh run: stale results must not pass for new ones
    prepare_hospital_workspace(sim_workspace, hospital_dirs)
    job_dir = Path(job_dir) if job_dir else find_job(FEDAVG_JOB_NAME)
    job = copy_fedavg_job(
        job_dir, workspace / "job" / job_dir.name, settings.server_args, settings.client_args, settings.model_args
    )
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
    hospitals = {}
    for name in settings.names:
        path = find_run_file(sim_workspace, name, RESULTS_FILE)
        entry = json.loads(path.read_text()) if path else {}
        if not entry.get("dice"):
            raise SplitUNetConfigError(
                f"{name} reported no Dice of the final global model (simulator exit code {return_code}); see {log_file}"
            )
        hospitals[name] = {**{key: value for key, value in entry.items() if key != "party"}, "results": str(path)}
    private = {name: entry["dp"] for name, entry in hospitals.items() if entry.get("dp")}
    global_model = find_run_file(sim_workspace, "server", GLOBAL_MODEL_FILE)
    cross_site = find_run_file(sim_workspace, "server", CROSS_SITE_RESULTS)
    first = hospitals[settings.names[0]]
    summary = {
        "job": job_dir.name,
        "dice": pooled_scores(hospitals),
        "hd95": pooled_scores(hospitals, "hd95"),
        "iterations": first["iterations"],
        "rounds": first["rounds"],
        "hospitals": hospitals,
        # Epsilon is per hospital: each protects its own patients, and no average of them means anything.
        "dp": {
            name: {
                "epsilon": record["epsilon"],
                "delta": record["delta"],
                "projected_epsilon": record["budget"]["epsilon"],
                "steps": record["budget"]["steps"],
            }
            for name, record in private.items()
        }
        or None,
        "global_model": str(global_model) if global_model else None,
        "cross_site_val": str(cross_site) if cross_site else None,
        "simulator_log": str(log_file),
        "simulator_exit_code": return_code,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(summary, workspace / "results.json")
    return summary


if __name__ == "__main__":  # pragma: no cover - a run at the defaults: python3 -m splitunet.horizontal.demo [WORKSPACE]
    import sys

    print(json.dumps(run_fedavg_demo(sys.argv[1] if len(sys.argv) > 1 else "fedavg_demo"), indent=2))
