"""Crop plans the server sends to every site, and the crop extraction each party applies to its own volumes.

The server chooses which cases, where and with which flips; each site cuts the same crop from its own modality
and the server from the labels, so the parts stay voxel-aligned. Sampling here looks only at case keys and
shapes, never at labels: crops centred on tumours would tell the sites where the tumours are (docs/design.md,
"Parties and one iteration").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["RandomCropPlanner", "extract_crop", "window_plan"]

_SPATIAL_DIMS = 3


def _size3(values: Sequence[int], what: str, minimum: int) -> list[int]:
    values = [int(v) for v in values]
    if len(values) != _SPATIAL_DIMS or min(values) < minimum:
        raise ValueError(f"{what} must be {_SPATIAL_DIMS} integers >= {minimum}, got {values}")
    return values


class RandomCropPlanner:
    """Label-independent random crop plans, one batch per call, reproducible from a seed and resumable.

    Cases are drawn epoch by epoch without replacement (a fresh shuffle of all keys per epoch; a batch may
    span two epochs). Each crop's origin is uniform over the positions where the crop fits inside the volume;
    on an axis where the volume is smaller than the crop the origin is 0 and :func:`extract_crop` pads. Each
    spatial axis is flipped with probability ``flip_prob``.

    Args:
        case_shapes: case key -> spatial shape ``(D, H, W)``; the order of the mapping does not matter.
        crop_size: crop size ``(d, h, w)``.
        batch_size: crops per plan.
        seed: seed of the numpy random generator.
        flip_prob: probability of flipping each spatial axis.
    """

    def __init__(
        self,
        case_shapes: Mapping[str, Sequence[int]],
        crop_size: Sequence[int],
        batch_size: int,
        seed: int,
        flip_prob: float = 0.5,
    ):
        if not case_shapes:
            raise ValueError("RandomCropPlanner needs at least one case")
        # Sorted, so that the same cases give the same plans whatever order they were reported in.
        self.keys = sorted(case_shapes)
        self.shapes = {key: _size3(case_shapes[key], f"shape of case {key}", 1) for key in self.keys}
        self.crop_size = _size3(crop_size, "crop_size", 1)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._order: list[str] = []
        self._position = 0
        self.epoch = 0
        self.plans_made = 0

    def _next_key(self) -> str:
        if self._position >= len(self._order):
            if self._order:
                self.epoch += 1
            self._order = [self.keys[i] for i in self._rng.permutation(len(self.keys))]
            self._position = 0
        key = self._order[self._position]
        self._position += 1
        return key

    def next_plan(self) -> dict:
        """Draw the next batch.

        Returns:
            a JSON-serializable plan ``{"keys": [...], "origins": [[z, y, x], ...], "size": [d, h, w],
            "flips": [[bool, bool, bool], ...]}`` with ``batch_size`` entries per list.
        """
        keys, origins, flips = [], [], []
        for _ in range(self.batch_size):
            key = self._next_key()
            origin = []
            for extent, size in zip(self.shapes[key], self.crop_size):
                # integers(0, n) draws from [0, n); n = extent - size + 1 positions keep the crop inside.
                origin.append(int(self._rng.integers(0, extent - size + 1)) if extent >= size else 0)
            keys.append(key)
            origins.append(origin)
            flips.append([bool(f) for f in self._rng.random(_SPATIAL_DIMS) < self.flip_prob])
        self.plans_made += 1
        return {"keys": keys, "origins": origins, "size": list(self.crop_size), "flips": flips}

    def state_dict(self) -> dict:
        """Everything needed to continue the same sequence of plans (JSON-serializable)."""
        return {
            "keys": list(self.keys),
            "crop_size": list(self.crop_size),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "flip_prob": self.flip_prob,
            "bit_generator": self._rng.bit_generator.state,
            "order": list(self._order),
            "position": self._position,
            "epoch": self.epoch,
            "plans_made": self.plans_made,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` output; the planner must have been made with the same cases.

        Raises:
            ValueError: the saved state is for other cases, another crop size or batch size.
        """
        for name in ("keys", "crop_size", "batch_size"):
            mine = getattr(self, name)
            if state[name] != mine:
                raise ValueError(f"cannot resume sampling: saved {name} {state[name]} differ from current {mine}")
        rng = np.random.default_rng()
        rng.bit_generator.state = dict(state["bit_generator"])
        self._rng = rng
        self._order = list(state["order"])
        self._position = int(state["position"])
        self.epoch = int(state["epoch"])
        self.plans_made = int(state["plans_made"])


def extract_crop(
    volume: np.ndarray, origin: Sequence[int], size: Sequence[int], flips: Sequence[bool] | None = None
) -> np.ndarray:
    """Cut a crop from a volume, zero-padding at the far end where the volume is smaller, then flip.

    Args:
        volume: ``(D, H, W)`` or ``(C, D, H, W)``.
        origin: first voxel ``(z, y, x)`` of the crop; must lie inside the volume.
        size: crop size ``(d, h, w)``.
        flips: whether to flip each spatial axis (after padding, so all parties flip the same padded grid).

    Returns:
        contiguous crop ``(d, h, w)`` or ``(C, d, h, w)``: ``float32`` for floating input, the input dtype
        otherwise (label and region masks keep their integer type).
    """
    volume = np.asarray(volume)
    if volume.ndim not in (_SPATIAL_DIMS, _SPATIAL_DIMS + 1):
        raise ValueError(f"volume must be (D, H, W) or (C, D, H, W), got shape {volume.shape}")
    spatial = volume.shape[-_SPATIAL_DIMS:]
    origin = [int(o) for o in origin]
    size = _size3(size, "size", 1)
    if len(origin) != _SPATIAL_DIMS or any(not 0 <= o < s for o, s in zip(origin, spatial)):
        raise ValueError(f"crop origin {origin} is outside the volume of spatial shape {list(spatial)}")
    flips = [False] * _SPATIAL_DIMS if flips is None else [bool(f) for f in flips]
    if len(flips) != _SPATIAL_DIMS:
        raise ValueError(f"flips must have {_SPATIAL_DIMS} entries, got {flips}")

    dtype = np.float32 if volume.dtype.kind == "f" else volume.dtype
    lead = volume.shape[:-_SPATIAL_DIMS]
    src = tuple(slice(o, min(o + n, s)) for o, n, s in zip(origin, size, spatial))
    piece = volume[(...,) + src]
    if list(piece.shape[-_SPATIAL_DIMS:]) == size:
        crop = piece.astype(dtype, copy=True)
    else:
        crop = np.zeros((*lead, *size), dtype=dtype)
        crop[(...,) + tuple(slice(0, n) for n in piece.shape[-_SPATIAL_DIMS:])] = piece
    axes = tuple(len(lead) + axis for axis, flip in enumerate(flips) if flip)
    if axes:
        crop = np.flip(crop, axis=axes)
    return np.ascontiguousarray(crop)


def window_plan(keys: Sequence[str], origins: Sequence[Sequence[int]], size: Sequence[int]) -> dict:
    """A plan without flips, e.g. for sliding-window inference; same format as :meth:`RandomCropPlanner.next_plan`."""
    keys = [str(k) for k in keys]
    origins = [[int(o) for o in origin] for origin in origins]
    if len(keys) != len(origins):
        raise ValueError(f"window_plan got {len(keys)} keys but {len(origins)} origins")
    if any(len(origin) != _SPATIAL_DIMS for origin in origins):
        raise ValueError(f"every origin must have {_SPATIAL_DIMS} entries, got {origins}")
    return {
        "keys": keys,
        "origins": origins,
        "size": _size3(size, "size", 1),
        "flips": [[False] * _SPATIAL_DIMS for _ in keys],
    }
