"""Host <-> GPU copies of a party's tensors through reused pinned buffers, so the copies can run asynchronously.

FLARE serializes tensors on the host, so every feature and gradient a GPU party sends or receives crosses here;
so do the crops it reads.

A copy from pageable host memory is staged by the driver and blocks; from page-locked (pinned) memory it is a
DMA that ``non_blocking=True`` overlaps with other work. Allocating pinned memory is slow, so buffers are kept
per (tag, direction, level, shape, dtype) and reused every step: a returned host buffer is valid until the
next call with the same tag, which the protocol puts after the tensors have left (one step in flight). On a
CPU device both copies are no-ops.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["PinnedStaging"]


class PinnedStaging:
    """Moves per-level tensors between a device and the host for serialization.

    Args:
        device: where the models run.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._pending: dict[str, torch.cuda.Event] = {}

    def _buffer(self, tag: str, level: int, like: torch.Tensor) -> torch.Tensor:
        key = (tag, level, tuple(like.shape), like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
            self._buffers[key] = buffer
        return buffer

    def to_host(self, tensors: Mapping[int, torch.Tensor], tag: str) -> dict[int, torch.Tensor]:
        """Device tensors -> host tensors (pinned buffers, valid until the next call with the same ``tag``)."""
        if not self.enabled:
            return {level: tensor.detach() for level, tensor in tensors.items()}
        host = {}
        for level, tensor in tensors.items():
            if tensor.device.type == "cpu":
                host[level] = tensor.detach()
                continue
            buffer = self._buffer(f"{tag}/d2h", level, tensor)
            buffer.copy_(tensor.detach(), non_blocking=True)
            host[level] = buffer
        # The host side reads the buffers next (serialization): wait for the DMA once, for all levels.
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def to_device(self, tensors: Mapping[int, torch.Tensor], tag: str) -> dict[int, torch.Tensor]:
        """Host tensors -> device tensors; the copies are queued on the current stream, not waited for."""
        if not self.enabled:
            return dict(tensors)
        tag = f"{tag}/h2d"
        if tag in self._pending:
            # The previous asynchronous copy out of these buffers must be done before they are overwritten.
            self._pending.pop(tag).synchronize()
        moved = {}
        for level, tensor in tensors.items():
            if tensor.device.type != "cpu":
                moved[level] = tensor.to(self.device)
                continue
            buffer = self._buffer(tag, level, tensor)
            buffer.copy_(tensor)
            moved[level] = buffer.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._pending[tag] = event
        return moved
