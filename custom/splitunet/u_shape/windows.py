"""Sliding-window inference whose windows wait for a round trip each: plan, cut, blend, one batch at a time.

MONAI's ``sliding_window_inference`` calls its predictor and expects the logits back in the same call. In the
U-shaped job the hospital's predictor needs the server's middle, and the server only talks through tasks it sends,
so a hospital cannot wait inside a call. :class:`SlidingWindows` therefore lays out the same windows MONAI would
(``dense_patch_slices`` with MONAI's scan interval) and blends the logits with MONAI's Gaussian importance map,
but lets the caller hand each batch's logits in later.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

__all__ = ["SlidingWindows", "scan_interval"]


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's step between windows: ``int(roi * (1 - overlap))`` per axis (at least 1), the roi where it fills
    the axis."""
    return tuple(
        int(roi) if roi == size else max(int(roi * (1 - overlap)), 1) for size, roi in zip(image_size, roi_size)
    )


class SlidingWindows:
    """The windows of one volume and the blend of their logits.

    A volume smaller than the window on an axis is zero-padded at the far end (as
    :func:`~splitunet.data.sampling.extract_crop` pads a crop), and the blend is cut back to the volume.

    Args:
        image: ``(C, D, H, W)`` volume.
        roi_size: window size.
        batch_size: windows per batch.
        overlap: window overlap.
        out_channels: channels of the logits handed in.
    """

    def __init__(
        self, image: np.ndarray, roi_size: Sequence[int], batch_size: int, overlap: float, out_channels: int = 3
    ):
        image = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy: cached volumes are read-only
        self.shape = tuple(int(s) for s in image.shape[1:])
        self.roi = tuple(int(r) for r in roi_size)
        pad = [max(r - s, 0) for r, s in zip(self.roi, self.shape)]
        # F.pad takes the last axis first: (w_before, w_after, h_before, h_after, d_before, d_after).
        self.image = F.pad(image, [p for extent in reversed(pad) for p in (0, extent)]) if any(pad) else image
        padded = tuple(int(s) for s in self.image.shape[1:])
        slices = dense_patch_slices(padded, self.roi, scan_interval(padded, self.roi, overlap))
        self.batches = [slices[i : i + batch_size] for i in range(0, len(slices), batch_size)]
        importance = compute_importance_map(self.roi, mode="gaussian", sigma_scale=0.125, device="cpu")
        # As MONAI does: no voxel's weight may vanish, or a corner covered by one window would divide by ~0.
        self.importance = importance.clamp_min(max(float(importance[importance > 0].min()), 1e-3))
        self.weighted = torch.zeros((out_channels, *padded))
        self.weights = torch.zeros((1, *padded))
        self.added = 0

    def window_batch(self, index: int) -> torch.Tensor:
        """The windows of batch ``index``: ``(n, C, *roi)``."""
        return torch.stack([self.image[(slice(None), *window)] for window in self.batches[index]])

    def add(self, index: int, logits: torch.Tensor) -> None:
        """Blend the logits ``(n, out_channels, *roi)`` of batch ``index``."""
        windows = self.batches[index]
        if logits.shape[0] != len(windows) or tuple(logits.shape[2:]) != self.roi:
            raise ValueError(f"batch {index} needs logits of {len(windows)} windows of {self.roi}, got {logits.shape}")
        logits = logits.detach().float().cpu()
        for window, window_logits in zip(windows, logits):
            self.weighted[(slice(None), *window)] += window_logits * self.importance
            self.weights[(slice(None), *window)] += self.importance
        self.added += 1

    @property
    def complete(self) -> bool:
        """Whether every batch's logits were added."""
        return self.added == len(self.batches)

    def probabilities(self) -> torch.Tensor:
        """Sigmoid of the blended logits, ``(out_channels, D, H, W)`` over the volume (padding cut off)."""
        if not self.complete:
            raise RuntimeError(f"only {self.added} of {len(self.batches)} window batches were added")
        logits = self.weighted / self.weights.clamp_min(torch.finfo(torch.float32).tiny)
        return torch.sigmoid(logits[(slice(None), *(slice(0, s) for s in self.shape))])
