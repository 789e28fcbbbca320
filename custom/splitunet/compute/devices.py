"""Device and thread choices shared by every party."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["THREADS_ENV_VAR", "select_device", "configure_threads", "torch_threads", "timed_call"]

# Several parties on one host (simulator, POC) would each take every core; the demo sets this to share them.
THREADS_ENV_VAR = "SPLITUNET_TORCH_THREADS"


def select_device(requested: str = "auto") -> torch.device:
    """``"auto"``: CUDA when this party has a GPU, else CPU; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def configure_threads(num_threads: int = 0) -> int:
    """Set torch's intra-op threads from the argument, else ``$SPLITUNET_TORCH_THREADS``; 0 keeps torch's default."""
    num_threads = int(num_threads or os.environ.get(THREADS_ENV_VAR, 0) or 0)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with ``num_threads`` intra-op threads and give torch its previous count back afterwards, also
    after an error (a study on shared cores should not change what the rest of the process uses)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def timed_call(device: torch.device, fn, *args):
    """Run ``fn(*args)`` and return ``(result, seconds)``; synchronises CUDA first, so the time is the work's."""
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start
