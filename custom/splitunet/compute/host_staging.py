"""Host <-> GPU copies of a party's tensors through reused pinned buffers, so the copies can run asynchronously.

FLARE serializes tensors on the host, so every feature and gradient a GPU party sends or receives crosses here;
so do the crops it reads.

A copy from pageable host memory is staged by the driver and blocks; from page-locked (pinned) memory it is a
DMA that ``non_blocking=True`` overlaps with other work. Allocating pinned memory is slow, so buffers are kept
per (tag, direction, level, shape, dtype) and reused every step: a returned host buffer is valid until the
next call with the same tag, which the protocol puts after the tensors have left (one step in flight). On a
CPU device both copies are no-ops.

A level may be an :class:`~splitunet.wire.codec.EncodedLevel` (codes and scales made on the device): its tensors
cross, so a level quantized to int8 on the GPU moves a quarter of float32's bytes. The bytes copied each way are
counted (:attr:`PinnedStaging.bytes_to_host`, :attr:`PinnedStaging.bytes_to_device`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from splitunet.wire.codec import EncodedLevel, tensor_bytes

__all__ = ["PinnedStaging", "Level"]

# What a level may be: a dense tensor, or its codes and scales.
Level = torch.Tensor | EncodedLevel


def _flatten(levels: Mapping[Hashable, Level]) -> dict[Hashable, torch.Tensor]:
    flat = {}
    for level, value in levels.items():
        if isinstance(value, EncodedLevel):
            flat.update({(level, name): tensor for name, tensor in value.tensors().items()})
        else:
            flat[level] = value
    return flat


def _unflatten(levels: Mapping[Hashable, Level], flat: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, Level]:
    return {
        level: (
            value.replace_tensors({name: flat[(level, name)] for name in value.tensors()})
            if isinstance(value, EncodedLevel)
            else flat[level]
        )
        for level, value in levels.items()
    }


class PinnedStaging:
    """Moves per-level tensors between a device and the host for serialization.

    Args:
        device: where the models run.

    Attributes:
        bytes_to_host: bytes copied device -> host so far (0 on a CPU device).
        bytes_to_device: bytes copied host -> device so far.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._pending: dict[str, torch.cuda.Event] = {}
        self.bytes_to_host = 0
        self.bytes_to_device = 0

    def _buffer(self, tag: str, level: Hashable, like: torch.Tensor) -> torch.Tensor:
        key = (tag, level, tuple(like.shape), like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
            self._buffers[key] = buffer
        return buffer

    def to_host(self, levels: Mapping[Hashable, Level], tag: str) -> dict[Hashable, Level]:
        """Device levels -> host levels (pinned buffers, valid until the next call with the same ``tag``)."""
        if not self.enabled:
            return {
                level: value.map_tensors(torch.Tensor.detach) if isinstance(value, EncodedLevel) else value.detach()
                for level, value in levels.items()
            }
        host = {}
        for level, tensor in _flatten(levels).items():
            if tensor.device.type == "cpu":
                host[level] = tensor.detach()
                continue
            buffer = self._buffer(f"{tag}/d2h", level, tensor)
            buffer.copy_(tensor.detach(), non_blocking=True)
            self.bytes_to_host += tensor_bytes(tensor)
            host[level] = buffer
        # The host side reads the buffers next (serialization): wait for the DMA once, for all levels.
        torch.cuda.current_stream(self.device).synchronize()
        return _unflatten(levels, host)

    def to_device(self, levels: Mapping[Hashable, Level], tag: str) -> dict[Hashable, Level]:
        """Host levels -> device levels; the copies are queued on the current stream, not waited for."""
        if not self.enabled:
            return dict(levels)
        tensors = _flatten(levels)
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
            self.bytes_to_device += tensor_bytes(tensor)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._pending[tag] = event
        return _unflatten(levels, moved)
