"""Automatic mixed precision for the in-process arms (``--amp``)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "AMP_DTYPE"]

# bfloat16 has float32's exponent range, so no gradient scaler is needed, unlike float16.
AMP_DTYPE = torch.bfloat16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in :data:`AMP_DTYPE` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPE)
