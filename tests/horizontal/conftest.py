"""Fixtures of the horizontal baseline's tests: one torch thread while they run."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """Run these tiny networks on one thread: more gain nothing at this size, and on cores that other processes
    share, OpenMP threads that wait for each other made a local round ten times slower (measured: 0.6 s against
    5-10 s for two iterations)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
