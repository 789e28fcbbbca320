"""The SplitFed job (several sites per modality) in the FLARE simulator on phantom data: data, workspace, run, summary.

The phantom and its vertical partition are the main demo's (:func:`splitunet.tools.demo.ensure_partitioned_phantom`);
its patients are then dealt to ``sites_per_modality`` groups (:func:`splitunet.data.site_groups.split_patients`), or
put in the groups the settings name (``groups``, :func:`splitunet.data.site_groups.write_groups`): group ``g``'s four
sites (``site-1`` .. ``site-4`` for the first, ``site-5`` .. ``site-8`` for the second, ...) hold
one modality each of that group's patients, and the label holder holds every label. The sites of one modality share
an ``encoder_seed`` (agreed among them, never sent), so that their encoders start equal and the first average is
one of copies of one model (docs/topologies.md, "Several sites per modality").

With ``capture_iterations`` or ``capture_weights`` the run is an evaluation run: its server records the activations
it receives at those iterations and the encoder weights of every averaging (``CaptureFeatures``, ``CaptureWeights``),
which ``splitunet leakage-splitfed`` attacks (:mod:`splitunet.evaluation.leakage.splitfed_leakage`).

The summary, ``<workspace>/results.json``, has the main demo's keys where they mean the same (``job``, ``dice``,
``hd95``, ``iterations``, ``sites``, ``activation_bytes_per_iteration``, ``checkpoints``, ``server_results``,
``simulator_log``, ``elapsed_s``), plus the server's ``cohorts`` and ``encoder_averaging``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.compute.devices import THREADS_ENV_VAR
from splitunet.data.case_keys import read_or_create_secret
from splitunet.data.party_settings import SETTINGS_FILE_NAME, write_settings
from splitunet.data.site_groups import group_sites, split_patients, write_groups
from splitunet.site.encoder_release import SHARE_ENCODER_KEY
from splitunet.site.policy_file import PRIVACY_FILE
from splitunet.tools.demo import ensure_partitioned_phantom
from splitunet.tools.deployment import (
    add_capture_filter,
    add_weights_capture_filter,
    copy_job_with_overrides,
    find_job,
    prepare_simulator_workspace,
)
from splitunet.tools.simulator import completed_server_results, run_simulator
from splitunet.wire.protocol import DataKind

__all__ = ["SPLITFED_JOB_NAME", "SplitFedDemoSettings", "run_splitfed_demo"]

SPLITFED_JOB_NAME = "split_unet_splitfed"


class SplitFedDemoSettings:
    """Size of a SplitFed simulator run.

    Args:
        sites_per_modality: how many sites hold each modality (each for other patients); the job's ``min_clients``
            is set to match.
        cases: phantom patients, dealt among the groups.
        shape: phantom volume shape.
        seed: phantom seed; also the seed of the deal of patients to groups.
        groups: per group, its patients' case IDs, instead of a deal (one group per site of a modality, so
            ``sites_per_modality`` of them); ``None`` (default): deal the patients.
        server_args: workflow arguments to set (``num_iterations``, ``encoder_averaging_every``, ``features``, ...).
        client_args: site executor arguments to set.
        threads_per_party: torch threads of each site (they compute at the same time).
        server_threads: torch threads of the server (0: every core).
        timeout_s: the simulator run's time limit.
        capture_iterations: training iterations whose activations the server records (``CaptureFeatures``, no
            gradients); with ``capture_weights`` or these, the workspace is an evaluation workspace.
        capture_weights: the server also records the encoder weights of every averaging (``CaptureWeights``: each
            site's copy as received, the average as sent).
        max_captures: ``CaptureFeatures``' bound on the files it writes (default: its own).
    """

    def __init__(
        self,
        sites_per_modality: int = 2,
        cases: int = 24,
        shape: Sequence[int] = (64, 64, 64),
        seed: int = 0,
        groups: Sequence[Sequence[str]] | None = None,
        server_args: Mapping | None = None,
        client_args: Mapping | None = None,
        threads_per_party: int = 1,
        server_threads: int = 0,
        timeout_s: float = 1800.0,
        capture_iterations: Sequence[int] = (),
        capture_weights: bool = False,
        max_captures: int | None = None,
    ):
        self.sites = group_sites(sites_per_modality)  # checks the count
        if groups is not None and len(groups) != sites_per_modality:
            raise ValueError(f"{len(groups)} groups of patients for {sites_per_modality} sites per modality")
        self.groups = None if groups is None else [list(members) for members in groups]
        self.sites_per_modality = sites_per_modality
        self.cases = cases
        self.shape = tuple(shape)
        self.seed = seed
        self.server_args = dict(server_args or {})
        self.client_args = dict(client_args or {})
        self.threads_per_party = threads_per_party
        self.server_threads = server_threads or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.capture_iterations = tuple(int(i) for i in capture_iterations)
        self.capture_weights = bool(capture_weights)
        self.max_captures = max_captures

    @property
    def evaluation(self) -> bool:
        """Whether the run records what crosses its server (only such a workspace may build the capture filters)."""
        return bool(self.capture_iterations) or self.capture_weights


def _point_sites_at_their_groups(settings_file: Path, data_dirs: Mapping[str, Path], seeds: Mapping[str, int]) -> None:
    """Give each site of the written workspace settings its group's folder and its modality's shared seed."""
    content = json.loads(settings_file.read_text())
    parties = content["parties"]
    for site, folder in data_dirs.items():
        parties[site]["data_dir"] = str(folder)
        parties[site]["encoder_seed"] = seeds[parties[site]["modality"]]
    write_settings(settings_file, parties, content["case_key_secret"])


def run_splitfed_demo(
    workspace: str | Path,
    settings: SplitFedDemoSettings | None = None,
    job_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    secret_file: str | Path | None = None,
) -> dict:
    """Run the SplitFed job on phantom data in the FLARE simulator; write ``<workspace>/results.json``.

    Args:
        workspace: folder of this run (data, simulator workspace, each party's checkpoints in
            ``checkpoints/<party>/<experiment>/``, job copy, log, results).
        settings: size of the run.
        job_dir: the job folder (default the bundle's ``jobs/split_unet_splitfed``).
        data_dir: where the phantom, its partition, the groups and the case-key secret live (default
            ``<workspace>/data``).
        secret_file: the data holders' case-key secret (default ``<data_dir>/case_key_secret.txt``; made when
            missing).

    Returns:
        the summary written to ``results.json``.

    Raises:
        SplitUNetConfigError: the run did not complete (the message names the log).
    """
    settings = settings or SplitFedDemoSettings()
    workspace = Path(workspace).resolve()
    data_dir = Path(data_dir).resolve() if data_dir else workspace / "data"
    started = time.perf_counter()
    parties = ensure_partitioned_phantom(data_dir, settings.cases, settings.shape, settings.seed)
    if settings.groups is None:
        groups = split_patients(parties, data_dir / "groups", settings.sites_per_modality, seed=settings.seed)
    else:
        groups = write_groups(parties, data_dir / "groups", settings.groups)
    sim_workspace, checkpoints = workspace / "simulator", workspace / "checkpoints"
    for folder in (sim_workspace, checkpoints):
        if folder.exists():
            shutil.rmtree(folder)  # a fresh run each time: stale checkpoints must not pass for new ones
    secret = read_or_create_secret(Path(secret_file) if secret_file else data_dir / "case_key_secret.txt")
    site_modalities = {site: modality for site, (modality, _) in settings.sites.items()}
    prepare_simulator_workspace(
        sim_workspace, parties, site_modalities, secret, checkpoint_root=checkpoints, evaluation=settings.evaluation
    )
    # Every site of this consortium opts in to sending its encoder for averaging (its own policy's choice, off
    # unless stated: splitunet.site.encoder_release); the simulator gives every party this one local/ folder.
    write_json_atomic({SHARE_ENCODER_KEY: True}, sim_workspace / "local" / PRIVACY_FILE)
    # One private seed per modality, shared by its sites only.
    seeds = {modality: secrets.randbits(63) for modality in set(site_modalities.values())}
    data_dirs = {site: groups[group] / modality for site, (modality, group) in settings.sites.items()}
    _point_sites_at_their_groups(sim_workspace / "local" / SETTINGS_FILE_NAME, data_dirs, seeds)
    job_dir = Path(job_dir) if job_dir else find_job(SPLITFED_JOB_NAME)
    server_args = {"num_threads": settings.server_threads, **settings.server_args}
    job = copy_job_with_overrides(job_dir, workspace / "job" / job_dir.name, server_args, settings.client_args)
    if settings.capture_iterations:
        add_capture_filter(
            job, settings.capture_iterations, data_kinds=[DataKind.ACTIVATIONS], max_captures=settings.max_captures
        )
    if settings.capture_weights:
        add_weights_capture_filter(job)
    meta_file = job / "meta.json"
    meta = json.loads(meta_file.read_text())
    write_json_atomic({**meta, "min_clients": len(settings.sites)}, meta_file)
    log_file = workspace / "simulator.log"
    return_code = run_simulator(
        job,
        sim_workspace,
        list(settings.sites),
        log_file,
        timeout_s=settings.timeout_s,
        env={THREADS_ENV_VAR: str(settings.threads_per_party)},
    )
    results_path, results = completed_server_results(sim_workspace, return_code, log_file)
    summary = {
        "job": job_dir.name,
        "dice": {region: results["dice"][region] for region in ("TC", "WT", "ET")},
        "hd95": {region: results["hd95"][region] for region in ("TC", "WT", "ET")} if results.get("hd95") else None,
        "iterations": results["iterations"],
        "sites": results.get("sites"),
        "activation_bytes_per_iteration": results.get("activation_bytes_per_iteration"),
        "cohorts": results.get("cohorts"),
        "encoder_averaging": results.get("encoder_averaging"),
        "history": results.get("history"),
        "checkpoints": results.get("checkpoints"),
        "server_results": str(results_path),
        "simulator_log": str(log_file),
        "simulator_exit_code": return_code,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(summary, workspace / "results.json")
    return summary


if __name__ == "__main__":  # pragma: no cover - a run at the defaults: python3 -m splitunet.tools.splitfed_demo [WS]
    import sys

    print(json.dumps(run_splitfed_demo(sys.argv[1] if len(sys.argv) > 1 else "splitfed_demo"), indent=2))
