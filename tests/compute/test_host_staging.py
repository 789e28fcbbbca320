"""host_staging: pinned buffers for GPU copies, a pass-through on the CPU."""

from __future__ import annotations

import pytest
import torch

from splitunet.compute.host_staging import PinnedStaging


def test_cpu_staging_passes_tensors_through():
    staging = PinnedStaging(torch.device("cpu"))
    tensors = {0: torch.randn(2, 3)}
    assert not staging.enabled
    assert staging.to_host(tensors, "a")[0] is not None
    assert staging.to_device(tensors, "a")[0] is tensors[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_staging_reuses_pinned_buffers():
    device = torch.device("cuda")
    staging = PinnedStaging(device)
    first = staging.to_host({0: torch.randn(4, 5, device=device)}, "a")[0]
    assert first.is_pinned()
    second_source = torch.randn(4, 5, device=device)
    second = staging.to_host({0: second_source}, "a")[0]
    assert second.data_ptr() == first.data_ptr()
    assert torch.equal(second, second_source.cpu())
    back = staging.to_device({0: second.clone()}, "a")[0]
    assert back.device.type == "cuda" and torch.equal(back, second_source)
