"""What an attacker holds: per-level feature (or gradient) tensors, checked and put in one canonical form.

The server's ``CaptureFeatures`` filter saves, per site and iteration, ``{"features": {"x0": tensor, ...},
"plan": {...}, "iteration", "site", "data_kind", "filter_trail"}``; :func:`observed_from_capture` turns such a
record into the ``level index -> tensor`` mapping every attack takes. Plain torch: no FLARE import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from splitunet.wire.protocol import NUM_LEVELS, level_index

__all__ = ["Observed", "check_observed", "observed_from_capture", "level_sizes", "resolve_crop_size"]

# Level index (0 = full resolution x0 .. 4 = bottleneck x4) -> tensor (B, C, D, H, W).
Observed = Mapping[int, torch.Tensor]

_SPATIAL_DIMS = 3


def _as_level(key: int | str) -> int:
    if isinstance(key, str):
        return level_index(key)
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < NUM_LEVELS:
        raise ValueError(f"observed levels must be ints in 0..{NUM_LEVELS - 1} or keys 'x0'..'x4', got {key!r}")
    return key


def check_observed(
    observed: Mapping[int | str, torch.Tensor], what: str = "observed features"
) -> dict[int, torch.Tensor]:
    """Validate observed tensors and return them as detached float32 copies keyed by level index.

    Args:
        observed: level index (or level key ``"x0"``..``"x4"``) -> tensor ``(B, C, D, H, W)``.
        what: name used in error messages.

    Returns:
        ``{level: tensor}`` sorted by level, each a detached ``float32`` clone (attacks never alter the input).

    Raises:
        ValueError: empty mapping, unknown level, a tensor that is not 5D or not floating point, NaN/Inf, or
            batch sizes that differ between levels.
    """
    if not isinstance(observed, Mapping) or not observed:
        raise ValueError(f"{what} must be a non-empty mapping level -> (B, C, D, H, W) tensor")
    checked: dict[int, torch.Tensor] = {}
    for key, tensor in observed.items():
        level = _as_level(key)
        if level in checked:
            raise ValueError(f"{what} give level x{level} twice")
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 + _SPATIAL_DIMS:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{what} at level x{level} must be a (B, C, D, H, W) tensor, got {shape}")
        if not tensor.is_floating_point():
            raise ValueError(f"{what} at level x{level} must be floating point, got {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{what} at level x{level} hold NaN or Inf values")
        checked[level] = tensor.detach().to(torch.float32).clone()
    batches = {level: t.shape[0] for level, t in checked.items()}
    if len(set(batches.values())) != 1:
        raise ValueError(f"{what} have different batch sizes per level: {batches}")
    return dict(sorted(checked.items()))


def observed_from_capture(record: Mapping) -> tuple[dict[int, torch.Tensor], dict | None]:
    """Split a ``CaptureFeatures`` record into observed tensors and the crop plan.

    Args:
        record: the loaded ``iteration_<n>.pt`` dictionary (``splitunet.checkpoint.load_checkpoint``).

    Returns:
        ``(observed, plan)``: ``{level: (B, C, D, H, W) float32}`` and the plan the site echoed (``None`` if absent).
        The plan's ``"size"`` is the crop size to pass as ``crop_size``.

    Raises:
        ValueError: the record has no ``"features"`` mapping, or its tensors fail :func:`check_observed`.
    """
    if not isinstance(record, Mapping) or not isinstance(record.get("features"), Mapping):
        raise ValueError("a capture record must be a mapping with a 'features' mapping ({'x0': tensor, ...})")
    kind = record.get("data_kind", "features")
    return check_observed(record["features"], what=str(kind)), record.get("plan")


def level_sizes(crop_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Spatial size of each encoder level for an input of ``crop_size`` ``(D, H, W)``.

    BasicUNet's ``Down`` max-pools by 2 with floor rounding, so level ``l`` is the size halved ``l`` times, each
    time rounded down.
    """
    size = tuple(int(s) for s in crop_size)
    if len(size) != _SPATIAL_DIMS or min(size) < 1:
        raise ValueError(f"crop_size must be {_SPATIAL_DIMS} positive ints (D, H, W), got {tuple(crop_size)}")
    sizes = [size]
    for _ in range(NUM_LEVELS - 1):
        size = tuple(s // 2 for s in size)
        sizes.append(size)
    return sizes


def resolve_crop_size(observed: Observed, crop_size: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The crop size ``(D, H, W)`` behind observed tensors, checked against every observed level.

    Args:
        observed: checked observed tensors (:func:`check_observed`).
        crop_size: the crop size if known (a capture's ``plan["size"]``). Without it, the size is read from
            level x0 if observed, else taken as the finest level's size times ``2**level`` (exact only for even
            crop sizes: pass ``crop_size`` when x0 is withheld).

    Raises:
        ValueError: an observed level's spatial size does not match ``crop_size``.
    """
    if crop_size is None:
        finest = min(observed)
        crop_size = tuple(int(s) * 2**finest for s in observed[finest].shape[2:])
    sizes = level_sizes(crop_size)
    for level, tensor in observed.items():
        if tuple(tensor.shape[2:]) != sizes[level]:
            raise ValueError(
                f"level x{level} has spatial size {tuple(tensor.shape[2:])}, but an input of size {sizes[0]} gives "
                f"{sizes[level]} at that level"
            )
    return sizes[0]
