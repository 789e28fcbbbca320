"""Atomic checkpoint and result writes: a crash mid-write never replaces a good file with a broken one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "write_json_atomic"]


def atomic_write_bytes(path: str | os.PathLike, writer) -> Path:
    """Call ``writer(file_object)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file lives in the same folder so that ``os.replace`` is an atomic rename on POSIX; it is
    flushed and fsync-ed first so that the rename never publishes a file whose data is still in flight.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` a checkpoint dictionary to ``path``."""
    return atomic_write_bytes(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (plain tensors and Python containers only)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")
    return atomic_write_bytes(path, lambda handle: handle.write(data))
