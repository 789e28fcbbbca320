"""Automatic mixed precision of a party's training passes (the ``amp`` option of the site executor and the server
controller, and ``splitunet bench --amp``).

It changes how a party computes, not what it sends: features and gradients leave in the job's wire precision.
As in MONAI's trainers, it is for CUDA devices; a party on a CPU trains in float32 and says so. On this project's
CPU machine (torch 2.13 CPU build, oneDNN), bfloat16 autocast made the weight gradients of 3D convolutions
on 2x2x2 inputs NaN in 6 of 10 random draws (8 -> 16 channels; the bottleneck of a 32^3 crop), which
killed training at iteration 1.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "amp_applies", "AMP_DTYPE"]

# bfloat16 has float32's exponent range, so no gradient scaler is needed, unlike float16.
AMP_DTYPE = torch.bfloat16


def amp_applies(device: torch.device, requested: bool) -> bool:
    """Whether a party on ``device`` that asked for AMP gets it: only on CUDA (see the module's note)."""
    return bool(requested) and torch.device(device).type == "cuda"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in :data:`AMP_DTYPE` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPE)
