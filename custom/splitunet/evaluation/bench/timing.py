"""Wall-clock timing of benchmark steps: per-component stopwatches, warm-up discarded, device synchronised."""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

__all__ = ["synchronize", "StepClock", "StepTimes"]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device``; CUDA launches return before the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Times the parts of one step; each part is summed under its name (``"site_compute"``, ...).

    Args:
        device: synchronised before each reading so that asynchronous GPU work is charged to its part.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to part ``name``."""
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.parts[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Add a duration measured elsewhere (e.g. a trainer's own compute time) to part ``name``."""
        self.parts[name] += float(seconds)

    def finish(self) -> dict[str, float]:
        """The parts and ``"total"`` (wall time since the clock was made); ``"other"`` is what no part covers."""
        synchronize(self.device)
        total = time.perf_counter() - self._start
        parts = dict(self.parts)
        # Python overhead, optimiser bookkeeping outside the timed parts: kept visible rather than hidden.
        parts["other"] = max(total - sum(parts.values()), 0.0)
        parts["total"] = total
        return parts


class StepTimes:
    """Per-step part times of a loop; the first ``warmup`` steps (allocator, caches, autotuning) are dropped.

    Args:
        warmup: steps not counted.
    """

    def __init__(self, warmup: int):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.steps: list[Mapping[str, float]] = []

    def record(self, parts: Mapping[str, float]) -> None:
        """Record one step's :meth:`StepClock.finish` output."""
        self.steps.append(dict(parts))

    @property
    def timed(self) -> list[Mapping[str, float]]:
        """The steps after warm-up."""
        return self.steps[self.warmup :]

    def mean(self) -> dict[str, float]:
        """Mean seconds per timed step of each part (a part absent from a step counts as 0 there).

        Also ``"total_median"`` (median of the step totals) and ``"timed_steps"``.

        Raises:
            ValueError: no step after warm-up.
        """
        timed = self.timed
        if not timed:
            raise ValueError(f"no timed step: {len(self.steps)} recorded, {self.warmup} of them warm-up")
        names = sorted({name for step in timed for name in step})
        means = {name: math.fsum(step.get(name, 0.0) for step in timed) / len(timed) for name in names}
        # On a shared machine one step can stall; the median shows whether the mean is typical.
        means["total_median"] = statistics.median(step["total"] for step in timed)
        means["timed_steps"] = len(timed)
        return means
