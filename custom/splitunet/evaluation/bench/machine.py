"""The machine a benchmark ran on, as the report states it: CPU, threads, GPU, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

from splitunet.compute.devices import THREADS_ENV_VAR

__all__ = ["describe_machine"]


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine(device: torch.device) -> dict:
    """CPU model and cores, torch threads, the GPU (if the device is one), Python and library versions."""
    device = torch.device(device)
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Set when the run bounded torch's threads (a shared machine); the FLARE parties always get it.
        "threads_env": os.environ.get(THREADS_ENV_VAR),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": _version("monai"),
        "nvflare": _version("nvflare"),
        "device": str(device),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        info.update(
            gpu_name=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info
