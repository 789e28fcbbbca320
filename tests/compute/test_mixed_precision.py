"""mixed_precision: autocast only when asked."""

from __future__ import annotations

import torch

from splitunet.compute.mixed_precision import AMP_DTYPE, amp_applies, autocast


def test_autocast_changes_the_compute_dtype_only_when_enabled():
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5, 5)
    with autocast(torch.device("cpu"), enabled=False):
        assert conv(x).dtype == torch.float32
    with autocast(torch.device("cpu"), enabled=True):
        assert conv(x).dtype == AMP_DTYPE


def test_amp_applies_on_cuda_devices_only():
    assert amp_applies(torch.device("cuda"), True)
    assert amp_applies("cuda:1", True)
    assert not amp_applies(torch.device("cuda"), False)
    assert not amp_applies(torch.device("cpu"), True)
