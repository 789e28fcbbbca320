"""``splitunet predict``: segment new cases with a trained Split-U-Net (``jobs/split_unet_infer``, simulator).

The sites encode the new cases with their saved encoders and the server decodes them (see
:class:`~splitunet.flare.inference_controller.SplitInferenceController`). The server knows cases only by keyed
hash; this command, which holds the data and the secret as every data holder does, names each output file by its
case ID.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from splitunet.atomic_files import atomic_write_bytes, write_json_atomic
from splitunet.data.case_keys import keys_to_case_ids
from splitunet.data.party_data import ModalityFolder
from splitunet.errors import SplitUNetConfigError
from splitunet.tools.deployment import (
    copy_job_with_overrides,
    default_site_modalities,
    find_job,
    prepare_simulator_workspace,
    recorded_layout,
)
from splitunet.tools.simulator import completed_server_results, run_simulator
from splitunet.wire.protocol import MODALITIES

__all__ = ["run_predict"]


def run_predict(
    data_dir: str | Path,
    checkpoints: str | Path,
    out_dir: str | Path,
    experiment: str = "split_unet",
    tag: str = "best",
    without: Sequence[str] = (),
    layout: str | None = None,
    timeout_s: float = 3600.0,
) -> dict:
    """Segment every case of a partitioned data folder; write ``<out_dir>/<case>.nii.gz`` and ``predictions.json``.

    Args:
        data_dir: new cases as ``splitunet partition`` lays them out (``flair/``, ``t1/``, ``t1gd/``, ``t2/``; a
            ``labels/`` folder is not needed).
        checkpoints: the training run's checkpoint root, holding ``<party>/<experiment>/`` per party (what
            ``splitunet prepare --checkpoint-dir`` or ``splitunet demo`` wrote: ``<demo workspace>/checkpoints``).
        out_dir: where segmentations, the simulator workspace and the log go.
        experiment: the training run's experiment name.
        tag: ``"best"`` or ``"last"`` checkpoint.
        without: modalities to leave out (their sites do not take part; needs a model trained with mean fusion).
        layout: label convention of the output (default: the one recorded in ``data_dir``, else MSD).
        timeout_s: seconds before the simulator is stopped.

    Returns:
        the summary written to ``predictions.json``.
    """
    started = time.perf_counter()
    data_dir, checkpoints, out_dir = Path(data_dir).resolve(), Path(checkpoints).resolve(), Path(out_dir).resolve()
    unknown = sorted(set(without) - set(MODALITIES))
    if unknown:
        raise SplitUNetConfigError(f"unknown modalities {unknown}; expected some of {MODALITIES}")
    if not checkpoints.is_dir():
        raise SplitUNetConfigError(f"checkpoint folder not found: {checkpoints}")
    # Site names as in training, so that each site finds its own checkpoint folder.
    sites = {site: modality for site, modality in default_site_modalities().items() if modality not in without}
    if not sites:
        raise SplitUNetConfigError("every modality was left out")
    layout = layout or recorded_layout(data_dir)
    # A fresh secret: keys only need to agree among the parties of this run.
    secret = secrets.token_hex(16)
    workspace = out_dir / "simulator"
    if workspace.exists():
        shutil.rmtree(workspace)
    prepare_simulator_workspace(workspace, data_dir, sites, secret, layout=layout, checkpoint_root=checkpoints)
    job = copy_job_with_overrides(
        find_job("split_unet_infer"), out_dir / "job", {"experiment": experiment, "checkpoint": tag}
    )
    log_file = out_dir / "simulator.log"
    print(f"Segmenting {data_dir} with sites {sites} (full log: {log_file})", flush=True)
    return_code = run_simulator(job, workspace, list(sites), log_file, timeout_s=timeout_s)
    results_path, results = completed_server_results(workspace, return_code, log_file)
    site, modality = next(iter(sites.items()))
    case_of = keys_to_case_ids(ModalityFolder(data_dir, modality, party=site).case_ids, secret, party=site)
    written = {}
    for key, prediction in sorted(results.get("predictions", {}).items()):
        target = out_dir / f"{case_of[key]}.nii.gz"
        data = Path(prediction["file"]).read_bytes()
        atomic_write_bytes(target, lambda handle, data=data: handle.write(data))
        written[case_of[key]] = {"file": str(target), "voxels": prediction["voxels"]}
    summary = {
        "predictions": written,
        "layout": results["layout"],
        "absent_modalities": results["absent_modalities"],
        "model": results["model"],
        "left_out_cases": results.get("left_out_cases", {}),
        "server_results": str(results_path),
        "simulator_log": str(log_file),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(summary, out_dir / "predictions.json")
    return summary
