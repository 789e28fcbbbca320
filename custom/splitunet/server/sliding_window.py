"""Sliding-window inference over a volume the server never sees: the sites encode each window, the server decodes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from monai.inferers import sliding_window_inference

from splitunet.data.sampling import window_plan

__all__ = ["EncodeFn", "DecodeFn", "split_sliding_window"]

# Encodes one plan at every site and returns their features in decoder order (None for an absent site).
EncodeFn = Callable[[dict], Sequence[Mapping[int, torch.Tensor] | None]]
# Fuses and decodes features to logits (B, 3, d, h, w).
DecodeFn = Callable[[Sequence[Mapping[int, torch.Tensor] | None]], torch.Tensor]


@torch.no_grad()
def split_sliding_window(
    key: str,
    shape: Sequence[int],
    encode: EncodeFn,
    decode: DecodeFn,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Sigmoid probabilities of a whole volume, window by window, with MONAI's Gaussian blending.

    MONAI's ``sliding_window_inference`` runs over a grid of voxel coordinates: each window it hands to the
    predictor tells where that window starts, the sites encode that window of their volume (named by its keyed
    case hash), and the decoder's logits go back to MONAI. The window is clipped to the volume so that MONAI never
    pads the coordinate grid.

    Args:
        key: keyed case hash, as the sites know it.
        shape: spatial shape ``(D, H, W)`` of the case.
        encode: asks the sites to encode a plan of windows.
        decode: the server's decoder.
        roi_size: window size (the training crop size).
        sw_batch_size: windows per round trip.
        overlap: window overlap.

    Returns:
        probabilities ``(3, D, H, W)`` on the CPU.
    """
    shape = tuple(int(s) for s in shape)
    roi = tuple(min(int(r), s) for r, s in zip(roi_size, shape))
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        origins = windows[:, :, 0, 0, 0].round().long().tolist()
        return decode(encode(window_plan([key] * len(origins), origins, roi))).cpu()

    logits = sliding_window_inference(
        grid[None], roi, sw_batch_size, predictor, overlap=overlap, mode="gaussian", sw_device="cpu", device="cpu"
    )
    return torch.sigmoid(logits[0])
