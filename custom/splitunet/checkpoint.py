"""Checkpoint files: ``torch.save`` through an atomic write, and a loader that accepts plain tensors only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from splitunet.atomic_files import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` a checkpoint dictionary to ``path``."""
    return atomic_write_bytes(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (plain tensors and Python containers only)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)
