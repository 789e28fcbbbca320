"""``splitunet demo``: phantom data, vertical partition, the main job in the FLARE simulator, results and a figure."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from splitunet.atomic_files import write_json_atomic
from splitunet.compute.devices import THREADS_ENV_VAR
from splitunet.data.case_keys import keys_to_case_ids
from splitunet.data.labels import get_layout, labels_to_regions
from splitunet.data.nifti_io import nifti_case_id, read_volume
from splitunet.data.partition import partition_msd
from splitunet.data.phantom import generate_phantom
from splitunet.tools.deployment import (
    add_capture_filter,
    copy_job_with_overrides,
    default_site_modalities,
    find_job,
    prepare_simulator_workspace,
    read_or_create_secret,
)
from splitunet.tools.simulator import completed_server_results, run_simulator
from splitunet.tools.visualize import plot_case_overview
from splitunet.wire.protocol import LABELS_PARTY, MODALITIES

__all__ = ["DemoSettings", "run_demo", "ensure_partitioned_phantom"]


class DemoSettings:
    """Size of the demo run. The defaults fit in 10 minutes on 2 CPU cores (measured times: README and CHANGELOG.md).

    Threads: the sites compute at the same time, so each gets ``threads_per_party`` torch threads; the server
    computes while every site waits for its gradients, so it gets ``server_threads`` (default: every core).
    Measured on 2 cores: server step 0.46 s with 2 threads against 0.90 s with 1, the same losses.

    Each site draws a private ``encoder_seed`` for its settings; ``encoder_seeds`` fixes them instead (runs that must
    start from the same encoders, such as a test that expects the same model every time).
    """

    def __init__(
        self,
        cases: int = 24,
        shape: Sequence[int] = (64, 64, 64),
        seed: int = 0,
        num_sites: int = len(MODALITIES),
        server_args: Mapping | None = None,
        client_args: Mapping | None = None,
        filter_args: Mapping[str, Mapping] | None = None,
        capture_iterations: Sequence[int] = (),
        threads_per_party: int = 1,
        server_threads: int = 0,
        timeout_s: float = 1800.0,
        encoder_seeds: Mapping[str, int] | None = None,
    ):
        self.cases = cases
        self.shape = tuple(shape)
        self.seed = seed
        self.num_sites = num_sites
        self.server_args = dict(server_args or {})
        self.client_args = dict(client_args or {})
        self.filter_args = {name: dict(args) for name, args in (filter_args or {}).items()}
        self.capture_iterations = tuple(int(i) for i in capture_iterations)
        self.threads_per_party = threads_per_party
        self.server_threads = server_threads or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.encoder_seeds = dict(encoder_seeds) if encoder_seeds else None


def ensure_partitioned_phantom(data_dir: Path, cases: int, shape: Sequence[int], seed: int) -> Path:
    """Make phantom data in MSD layout and split it per party, unless already there. Returns the partition."""
    source, parties = data_dir / "phantom_msd", data_dir / "parties"
    if (source / "dataset.json").is_file():
        existing = json.loads((source / "dataset.json").read_text())["numTraining"]
        # Re-generating would silently change what earlier results were measured on; say what is reused.
        print(f"Reusing {existing} phantom cases in {source} (delete it to generate {cases} new ones)", flush=True)
    else:
        print(f"Generating {cases} phantom cases of shape {tuple(shape)} in {source}", flush=True)
        generate_phantom(source, cases, shape=tuple(shape), seed=seed)
    if not (parties / LABELS_PARTY).is_dir():
        print(f"Partitioning into one folder per party in {parties}", flush=True)
        partition_msd(source, parties)
    return parties


def _preview(results: Mapping, parties: Path, secret: str, out_png: Path) -> Path | None:
    predictions = results.get("predictions") or {}
    if not predictions:
        return None
    key, prediction_path = next(iter(predictions.items()))
    # The server names its previews by case key; the demo holds the data and the secret, as every data holder does.
    case_ids = sorted(filter(None, (nifti_case_id(path) for path in (parties / LABELS_PARTY).iterdir())))
    case = keys_to_case_ids(case_ids, secret, party="demo")[key]
    layout = get_layout("msd")
    flair, _, _ = read_volume(parties / "flair" / f"{case}.nii.gz", party="demo", case=case)
    labels, _, _ = read_volume(parties / LABELS_PARTY / f"{case}.nii.gz", party="demo", case=case)
    predicted, _, _ = read_volume(prediction_path, party="demo", case=case)
    dice = results.get("dice", {})
    title = (
        f"{case} (held out): FLAIR, Dice TC {dice.get('TC', float('nan')):.2f} WT {dice.get('WT', float('nan')):.2f} "
        f"ET {dice.get('ET', float('nan')):.2f} over the validation cases"
    )
    return plot_case_overview(
        flair,
        labels_to_regions(np.rint(labels).astype(np.int64), layout),
        labels_to_regions(np.rint(predicted).astype(np.int64), layout),
        out_png,
        title,
    )


def run_demo(
    workspace: str | Path,
    settings: DemoSettings | None = None,
    job_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> dict:
    """Run a job (default the main one) on phantom data in the FLARE simulator; write ``<workspace>/results.json``.

    Args:
        workspace: folder of this run (data, simulator workspace, each party's checkpoints in
            ``checkpoints/<party>/<experiment>/`` for ``splitunet predict``, results, figure).
        settings: size of the run.
        job_dir: job folder to run (default ``jobs/split_unet``).
        data_dir: where the phantom data and the case-key secret live (default ``<workspace>/data``); runs that
            share it train and validate on the same cases, so their results compare.

    Returns:
        the summary written to ``results.json``.
    """
    settings = settings or DemoSettings()
    workspace = Path(workspace).resolve()
    data_dir = Path(data_dir).resolve() if data_dir else workspace / "data"
    started = time.perf_counter()
    parties = ensure_partitioned_phantom(data_dir, settings.cases, settings.shape, settings.seed)
    site_modalities = default_site_modalities(settings.num_sites)
    sim_workspace, checkpoints = workspace / "simulator", workspace / "checkpoints"
    for folder in (sim_workspace, checkpoints):
        if folder.exists():
            shutil.rmtree(folder)  # a fresh run each time: stale checkpoints must not pass for new ones
    secret = read_or_create_secret(data_dir / "case_key_secret.txt")
    prepare_simulator_workspace(
        sim_workspace,
        parties,
        site_modalities,
        secret,
        checkpoint_root=checkpoints,
        evaluation=bool(settings.capture_iterations),  # only a capturing run may build the capture filter
        encoder_seeds=settings.encoder_seeds,
    )
    job_dir = Path(job_dir) if job_dir else find_job("split_unet")
    server_args = {"num_threads": settings.server_threads, **settings.server_args}
    job = copy_job_with_overrides(
        job_dir, workspace / "job" / job_dir.name, server_args, settings.client_args, settings.filter_args
    )
    if settings.capture_iterations:
        add_capture_filter(job, settings.capture_iterations)
    log_file = workspace / "simulator.log"
    print(f"Running the FLARE simulator with sites {site_modalities} (full log: {log_file})", flush=True)
    return_code = run_simulator(
        job,
        sim_workspace,
        list(site_modalities),
        log_file,
        timeout_s=settings.timeout_s,
        env={THREADS_ENV_VAR: str(settings.threads_per_party)},
    )
    server_results_path, results = completed_server_results(sim_workspace, return_code, log_file)
    preview = _preview(results, parties, secret, workspace / "preview.png")
    tb_dir = server_results_path.parent / "tb_events"
    summary = {
        "job": job_dir.name,
        "dice": {region: results["dice"][region] for region in ("TC", "WT", "ET")},
        "hd95": {region: results["hd95"][region] for region in ("TC", "WT", "ET")} if results.get("hd95") else None,
        "iterations": results["iterations"],
        "optimizer": results.get("optimizer"),
        "best": results.get("best"),
        "history": results.get("history"),
        "sites": results.get("sites"),
        "timing_per_iteration_s": results.get("timing_per_iteration_s"),
        "activation_bytes_per_iteration": results.get("activation_bytes_per_iteration"),
        "filters": results.get("filters"),
        "checkpoints": results.get("checkpoints"),
        "tensorboard": str(tb_dir) if tb_dir.is_dir() else None,
        "preview_png": str(preview) if preview else None,
        "server_results": str(server_results_path),
        "simulator_log": str(log_file),
        "simulator_exit_code": return_code,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(summary, workspace / "results.json")
    return summary
