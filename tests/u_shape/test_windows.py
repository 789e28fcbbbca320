"""u_shape.windows: MONAI's windows and Gaussian blend, with the logits handed in one batch at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from splitunet.u_shape.windows import SlidingWindows


def _logits_of(windows: torch.Tensor) -> torch.Tensor:
    # A position-dependent stand-in for the network: three channels from the window's own voxels.
    return torch.cat([windows[:, :1] * 0.5, windows[:, 1:2] - 1.0, windows[:, :1] * windows[:, 1:2]], dim=1)


def test_batches_handed_in_later_blend_as_monai_does_in_one_call():
    image = np.random.default_rng(0).normal(size=(2, 40, 37, 35)).astype(np.float32)
    windows = SlidingWindows(image, (32, 32, 32), batch_size=3, overlap=0.25)
    for index in reversed(range(len(windows.batches))):  # any order: each batch names its windows
        windows.add(index, _logits_of(windows.window_batch(index)))
    expected = sliding_window_inference(
        torch.from_numpy(image)[None], (32, 32, 32), 3, _logits_of, overlap=0.25, mode="gaussian"
    )
    torch.testing.assert_close(windows.probabilities(), torch.sigmoid(expected[0]), rtol=1e-4, atol=1e-5)


def test_a_volume_smaller_than_the_window_is_padded_and_cut_back():
    windows = SlidingWindows(np.ones((4, 24, 30, 24), dtype=np.float32), (32, 32, 32), batch_size=4, overlap=0.25)
    assert len(windows.batches) == 1 and tuple(windows.window_batch(0).shape) == (1, 4, 32, 32, 32)
    with pytest.raises(RuntimeError, match="0 of 1"):
        windows.probabilities()
    windows.add(0, torch.full((1, 3, 32, 32, 32), 2.0))
    probabilities = windows.probabilities()
    assert tuple(probabilities.shape) == (3, 24, 30, 24)
    torch.testing.assert_close(probabilities, torch.full_like(probabilities, float(torch.sigmoid(torch.tensor(2.0)))))
    with pytest.raises(ValueError, match="needs logits of 1 windows"):
        windows.add(0, torch.zeros(2, 3, 32, 32, 32))
