"""Bytes per iteration on the wire, per skip level and direction, in each wire precision.

Sizes are of real encoded payloads: each level of the activations a step sent (up) and the gradients it received
(down) is encoded by :func:`splitunet.evaluation.bench.wire.encode_levels` (a cast, or the affine integer codes that the
``QuantizeFeatures`` filter writes) and counted by :func:`splitunet.wire.codec.entry_bytes`, the count the
controller reports. Serialization headers are not included (they are counted by the serialized size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from splitunet.evaluation.bench.wire import WIRE_PRECISIONS, encode_levels
from splitunet.wire.codec import entry_bytes
from splitunet.wire.protocol import level_key

__all__ = ["encoded_bytes", "byte_table", "DIRECTIONS"]

# Activations travel site -> server ("up"), their gradients server -> site ("down").
DIRECTIONS = ("up", "down")


def encoded_bytes(tensors: Mapping[int, torch.Tensor], precision: str) -> dict[int, int]:
    """Bytes of each level once encoded in ``precision``."""
    payloads, encodings = encode_levels(tensors, precision)
    return {level: entry_bytes(payloads[level], encodings.get(level)) for level in payloads}


def byte_table(
    up: Sequence[Mapping[int, torch.Tensor]],
    down: Sequence[Mapping[int, torch.Tensor]],
    precisions: Sequence[str] = tuple(WIRE_PRECISIONS),
) -> dict:
    """Bytes of one iteration summed over sites, by level, direction and precision.

    Args:
        up: per site, the activations it sent (level -> tensor).
        down: per site, the gradients it received.
        precisions: wire precisions to count.

    Returns:
        ``{"levels": {"x0": {"shape": [...], "up": {precision: bytes}, "down": {...}}, ...},
        "total": {"up": {...}, "down": {...}, "both": {...}}, "num_sites": n}``.
    """
    if len(up) != len(down):
        raise ValueError(f"activations of {len(up)} sites but gradients of {len(down)}")
    levels: dict[str, dict] = {}
    total = {direction: dict.fromkeys(precisions, 0) for direction in (*DIRECTIONS, "both")}
    for direction, per_site in zip(DIRECTIONS, (up, down)):
        for tensors in per_site:
            for precision in precisions:
                for level, count in encoded_bytes(tensors, precision).items():
                    entry = levels.setdefault(
                        level_key(level),
                        {"shape": list(tensors[level].shape), **{d: dict.fromkeys(precisions, 0) for d in DIRECTIONS}},
                    )
                    entry[direction][precision] += count
                    total[direction][precision] += count
                    total["both"][precision] += count
    return {"levels": dict(sorted(levels.items())), "total": total, "num_sites": len(up)}
