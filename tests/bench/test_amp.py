"""bench.amp: autocast only when asked."""

from __future__ import annotations

import torch

from splitunet.bench.amp import AMP_DTYPE, autocast


def test_autocast_changes_the_compute_dtype_only_when_enabled():
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5, 5)
    with autocast(torch.device("cpu"), enabled=False):
        assert conv(x).dtype == torch.float32
    with autocast(torch.device("cpu"), enabled=True):
        assert conv(x).dtype == AMP_DTYPE
