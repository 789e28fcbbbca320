"""compute.devices: a study's thread count applies to its block only, also when the block fails."""

from __future__ import annotations

import pytest
import torch

from splitunet.compute.devices import torch_threads


def test_the_thread_count_is_set_for_the_block_and_restored_after_it_and_after_an_error():
    before = torch.get_num_threads()
    inside = 1 if before != 1 else 2
    with torch_threads(inside):
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="study failed"):
        with torch_threads(inside):
            raise RuntimeError("study failed")
    assert torch.get_num_threads() == before
