"""The main job's training settings, read from its server config so the benchmark trains what the job trains.

Read from ``jobs/<job>/*/config/config_fed_server.json`` without FLARE (the GPU machine has no nvflare): the
workflow's ``args`` are the :class:`~splitunet.flare.SplitLearningController` arguments the job sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import splitunet
from splitunet.errors import SplitUNetConfigError
from splitunet.wire.model_config import SplitModelConfig

__all__ = ["job_training_args", "job_wire_precision", "main_job_dir"]


def main_job_dir(name: str = "split_unet") -> Path:
    """The bundle's job folder ``jobs/<name>`` (the checkout the package was installed from)."""
    return Path(splitunet.__file__).resolve().parents[2] / "jobs" / name


def job_training_args(job_dir: str | Path | None = None) -> dict:
    """The split-learning workflow arguments of a job (default the main job), as written in its config.

    Raises:
        SplitUNetConfigError: no server config, or no ``SplitLearningController`` workflow in it.
    """
    job_dir = Path(job_dir) if job_dir else main_job_dir()
    configs = sorted(job_dir.glob("*/config/config_fed_server.json"))
    if not configs:
        raise SplitUNetConfigError(f"no */config/config_fed_server.json under {job_dir}; pass the job folder")
    for config in configs:
        for workflow in json.loads(config.read_text()).get("workflows", []):
            if workflow.get("path", "").endswith("SplitLearningController"):
                return dict(workflow.get("args", {}))
    raise SplitUNetConfigError(f"{configs[0]} has no SplitLearningController workflow")


def job_wire_precision(job_dir: str | Path | None = None) -> str:
    """What a job puts on the wire by default: a ``QuantizeFeatures`` filter's precision, else its transfer dtype.

    Only filters that act on every level count (one that quantizes some levels leaves the rest in the dtype).
    """
    job_dir = Path(job_dir) if job_dir else main_job_dir()
    for config in sorted(job_dir.glob("*/config/config_fed_*.json")):
        content = json.loads(config.read_text())
        for chain in content.get("task_data_filters", []) + content.get("task_result_filters", []):
            for entry in chain.get("filters", []):
                args = entry.get("args", {})
                if entry.get("path", "").endswith("QuantizeFeatures") and args.get("levels") is None:
                    return str(args.get("precision", "int8"))  # QuantizeFeatures' own default
    return str(job_training_args(job_dir).get("transfer_dtype", SplitModelConfig.transfer_dtype))
