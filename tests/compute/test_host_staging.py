"""host_staging: pinned buffers for GPU copies, a pass-through on the CPU."""

from __future__ import annotations

import pytest
import torch

from splitunet.compute.host_staging import PinnedStaging
from splitunet.wire.codec import EncodedLevel


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


def test_encoded_levels_keep_their_form_and_a_cpu_counts_no_copies():
    staging = PinnedStaging(torch.device("cpu"))
    level = EncodedLevel.affine(torch.randn(2, 3, 4, 4, 4), 8)
    host = staging.to_host({0: level, 1: torch.randn(2, 3)}, "a")
    assert isinstance(host[0], EncodedLevel) and torch.equal(host[0].decode(), level.decode())
    assert staging.to_device(host, "a")[0] is host[0]
    assert staging.bytes_to_host == staging.bytes_to_device == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_staging_moves_and_counts_the_tensors_of_encoded_levels():
    device = torch.device("cuda")
    staging = PinnedStaging(device)
    dense = torch.randn(2, 8, 16, 16, 16, device=device)
    host = staging.to_host({0: EncodedLevel.affine(dense, 8)}, "a")[0]
    assert host.payload.is_pinned() and host.encoding["low"].is_pinned()
    assert staging.bytes_to_host == host.nbytes == 2 * 8 * 16**3 + 2 * 2 * 8 * 4
    back = staging.to_device({0: host}, "a")[0]
    torch.cuda.synchronize()
    assert back.payload.device.type == "cuda" and staging.bytes_to_device == host.nbytes
    assert torch.equal(back.decode().cpu(), host.decode())
