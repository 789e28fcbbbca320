"""Per-iteration step times of a FLARE run, read back from the controller's TensorBoard scalars.

``results.json`` holds only the means over every iteration, the first ones included; at 128^3 on a CPU the first
steps are slower (allocator, caches) and a run of five iterations cannot hide them. The controller also sends each
step's parts as scalars (``site_compute_s``, ``server_compute_s``, ``wait_transfer_s``), which the job's
TensorBoard receiver writes under ``<server run>/tb_events``: from them the warm-up is left out.
"""

from __future__ import annotations

import statistics
from pathlib import Path

__all__ = ["STEP_SCALARS", "read_step_series", "timed_step_means"]

# The step-time parts of the report and the controller's scalar of each.
STEP_SCALARS = {
    "site_compute": "site_compute_s",
    "server_compute": "server_compute_s",
    "waiting_transfer": "wait_transfer_s",
}


def read_step_series(run_dir: str | Path) -> dict[str, dict[int, float]] | None:
    """Step -> seconds of each part, from the TensorBoard events of a server run folder.

    Returns:
        ``{part: {step: seconds}}``, or ``None`` where there are no events or TensorBoard is not installed.
    """
    events = Path(run_dir) / "tb_events"
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    folders = sorted({path.parent for path in events.rglob("events.out.tfevents*")}) if events.is_dir() else []
    series: dict[str, dict[int, float]] = {part: {} for part in STEP_SCALARS}
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
        accumulator.Reload()
        tags = set(accumulator.Tags().get("scalars", []))
        for part, tag in STEP_SCALARS.items():
            if tag in tags:
                series[part].update({int(event.step): float(event.value) for event in accumulator.Scalars(tag)})
    return series if all(series.values()) else None


def timed_step_means(series: dict[str, dict[int, float]], warmup: int) -> dict | None:
    """Mean of each part over the steps after the first ``warmup`` (steps common to every part).

    Returns:
        ``{"step_time_s": {part: mean, "total": sum of the means}, "timed_steps": [...], "total_per_step_s": [...]}``,
        or ``None`` when no step is left after the warm-up.
    """
    steps = sorted(set.intersection(*(set(values) for values in series.values())))
    timed = steps[warmup:]
    if not timed:
        return None
    means = {part: statistics.fmean(series[part][step] for step in timed) for part in series}
    means["total"] = sum(means.values())
    return {
        "step_time_s": means,
        "timed_steps": timed,
        # Every step, warm-up included: the spread that the means hide.
        "total_per_step_s": [sum(series[part][step] for part in series) for step in steps],
    }
