"""Fixtures of the DP-SGD tests: one torch thread while they run (tiny networks gain nothing from more, and on shared
cores OpenMP threads waiting for each other made them several times slower)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
