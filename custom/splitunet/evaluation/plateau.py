"""Where has each row of a study levelled off? The window reading of its runs' learning curves.

A run's end point is one draw. Under the study's constant learning rate a converged run's held-out Dice still moves
from one scoring to the next (by several points on the phantom, see ``docs/topologies.md``), so a row read at its
end, or its end against its half-budget point, carries that noise once or twice. A study scored on the way
(``splitunet compare --curve-every``) holds every scoring, and a window of the last ones reads each run more steadily:

* **level**: each run's mean over the window's scorings (mean Dice and each region); over seeds, the mean and its 95 %
  Student's t interval (:func:`splitunet.evaluation.intervals.t_interval`); the gap to the reference row, paired by
  seed, likewise;
* **trend**: each run's least-squares slope of mean Dice over the window's steps, times the window's length in steps:
  the change its own trend implies across the window. Over seeds, its interval is read as ``compare-budgets`` reads a
  change (:func:`splitunet.evaluation.budget_change.settle_verdict`): *settled* when the whole interval lies within
  ``±tolerance``, *still rising*/*still falling* when it excludes 0, *not shown either way* otherwise.

Each drift treatment (DWCS, FedProx) is read over the same window, paired with its plain row by seed, and DWCS
with FedProx (:func:`splitunet.evaluation.drift_treatments.treatment_differences` on the runs' levels): the
treatment's effect on where the runs level off, with the end point's scoring noise averaged out.

DP-SGD rows are not read: their noise is calibrated for the whole budget, so a window of their curve is not the
level a longer budget at the same epsilon would reach.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.budget_change import DEFAULT_TOLERANCE, DP_ROW_NOT_READ, settle_verdict
from splitunet.evaluation.drift_treatments import treatment_differences, treatment_markdown
from splitunet.evaluation.intervals import t_interval
from splitunet.evaluation.utility import REGIONS, _interval_cell, _mean_dice

__all__ = ["MIN_WINDOW_SCORINGS", "plateau_markdown", "plateau_reading", "window_start"]

# A slope through two points is their difference again: the trend needs at least three scorings.
MIN_WINDOW_SCORINGS = 3


def window_start(report: Mapping) -> int | None:
    """The default window's first step: the last scoring at or before half the budget (the second half of every run,
    its half-budget point included); ``None`` for a study that scored no curves."""
    runs = (report.get("runs") or {}).values()
    steps = sorted({point["iteration"] for seeds in runs for run in seeds.values() for point in run.get("curve") or []})
    if not steps:
        return None
    total = int((report.get("settings") or {}).get("steps") or steps[-1])
    return max([step for step in steps if step <= total // 2] or [steps[0]])


def _slope(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` over ``steps``."""
    centre_x, centre_y = statistics.fmean(steps), statistics.fmean(values)
    spread = sum((x - centre_x) ** 2 for x in steps)
    return sum((x - centre_x) * (y - centre_y) for x, y in zip(steps, values)) / spread


def _run_window(curve: list[Mapping], start: int, label: str, seed: str) -> dict:
    """One run's level (mean over the window's scorings, per region and mean Dice) and trend across the window."""
    points = sorted((point for point in curve if point["iteration"] >= start), key=lambda point: point["iteration"])
    if len(points) < MIN_WINDOW_SCORINGS:
        scored = [point["iteration"] for point in curve]
        raise SplitUNetConfigError(
            f"{label}, seed {seed}: {len(points)} scoring(s) from step {start} on (scored at {scored or 'none'}); a "
            f"trend needs {MIN_WINDOW_SCORINGS} (run the study with a smaller curve_every, or start the window earlier)"
        )
    steps = [int(point["iteration"]) for point in points]
    means = [_mean_dice(point["dice"]) for point in points]
    level = {region: statistics.fmean(float(point["dice"][region]) for point in points) for region in REGIONS}
    level["mean"] = statistics.fmean(means)
    return {"level": level, "trend": _slope(steps, means) * (steps[-1] - steps[0]), "steps": steps}


def plateau_reading(report: Mapping, start: int | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Each row of a ``compare.json`` report read over a window of its runs' last scorings.

    Args:
        report: a study run with ``curve_every`` (``runs`` holding each run's ``curve``).
        start: the window's first step (default :func:`window_start`: the second half of the budget).
        tolerance: half-width, in Dice, within which a whole trend interval counts as settled.

    Returns:
        ``start``, ``steps`` (the window's scorings), ``tolerance``, ``reference`` (its label), ``rows``: per row read,
        ``key``, ``label``, ``seeds``, ``level`` (``t_interval`` over seeds of each run's window mean, for ``mean``
        and each region), ``level_by_seed`` (mean Dice), ``levels_by_seed`` (mean Dice and each region), ``trend``
        (``t_interval`` of the change each run's slope implies across the window) and its ``verdict``, ``gap``
        (paired window-mean difference to the reference; absent for the reference itself); ``treatments``: each
        drift treatment's paired difference of levels to its plain row (entries of
        :func:`~splitunet.evaluation.drift_treatments.treatment_differences`); and ``unread``: label -> why a row
        has no line.

    Raises:
        SplitUNetConfigError: the study scored no curves, or a run has fewer than three scorings in the window.
    """
    start = window_start(report) if start is None else int(start)
    if start is None:
        raise SplitUNetConfigError("the study scored no learning curves (run it with curve_every)")
    runs = report.get("runs") or {}
    rows, unread, windows = [], {}, {}
    for row in report["rows"]:
        if row.get("target_epsilon") is not None:
            unread[row["label"]] = DP_ROW_NOT_READ
            continue
        windows[row["key"]] = {
            seed: _run_window((runs.get(row["key"], {}).get(seed) or {}).get("curve") or [], start, row["label"], seed)
            for seed in row["dice_by_seed"]
        }
    reference = report["rows"][0]["key"] if report["rows"] else None
    steps = sorted({step for by_seed in windows.values() for run in by_seed.values() for step in run["steps"]})
    for row in report["rows"]:
        by_seed = windows.get(row["key"])
        if by_seed is None:
            continue
        seeds = sorted(by_seed, key=int)
        level = {name: t_interval([by_seed[s]["level"][name] for s in seeds]) for name in ("mean", *REGIONS)}
        trend = t_interval([by_seed[s]["trend"] for s in seeds])
        entry = {
            "key": row["key"],
            "label": row["label"],
            "seeds": [int(s) for s in seeds],
            "level": level,
            "level_by_seed": {s: by_seed[s]["level"]["mean"] for s in seeds},
            "levels_by_seed": {s: dict(by_seed[s]["level"]) for s in seeds},
            "trend": trend,
            "verdict": settle_verdict(trend, tolerance),
        }
        if row["key"] != reference and reference in windows:
            paired = [s for s in seeds if s in windows[reference]]
            entry["gap"] = t_interval(
                [by_seed[s]["level"]["mean"] - windows[reference][s]["level"]["mean"] for s in paired]
            )
        rows.append(entry)
    return {
        "start": start,
        "steps": steps,
        "tolerance": tolerance,
        "reference": report.get("reference"),
        "rows": rows,
        # The window's levels stand in for the end points: the same pairing, a steadier figure per run.
        "treatments": treatment_differences(
            [{"key": row["key"], "label": row["label"], "dice_by_seed": row["levels_by_seed"]} for row in rows]
        ),
        "unread": unread,
    }


_WINDOW_TREATMENT_INTRO = (
    "Each drift treatment against its own topology's plain averaging, then DWCS against FedProx on the same "
    "topology, over the same window: each run's level, paired by seed (the treatment minus the row it is set "
    "against, Dice points, mean over seeds [95 % t interval]); 'helps' or 'hurts' only where the mean-Dice interval "
    "excludes 0."
)


def _level_cell(interval: Mapping) -> str:
    return _interval_cell(interval, scale=1.0, spec=".3f")  # a Dice, not a difference in points


def plateau_markdown(reading: Mapping) -> str:
    """The table of :func:`plateau_reading`."""
    steps = ", ".join(str(step) for step in reading["steps"])
    points = 100 * reading["tolerance"]
    lines = [
        f"Each row over the scorings at steps {steps}: its level (each run's mean over them; mean over seeds [95 % t "
        "interval]) and its trend (each run's least-squares change across the window, Dice points). 'settled': the "
        f"whole trend interval lies within ±{points:g} points; 'still rising'/'still falling': it excludes 0; 'not "
        f"shown either way': it holds 0 but is wider. The gap is each row's level minus that of "
        f"'{reading['reference']}', paired by seed, in Dice points.",
        "",
        "| topology | seeds | level: mean Dice | TC | WT | ET | trend across the window | verdict | gap to reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in reading["rows"]:
        cells = [
            row["label"],
            ", ".join(str(seed) for seed in row["seeds"]) or "-",
            _level_cell(row["level"]["mean"]),
            *(_level_cell(row["level"][region]) for region in REGIONS),
            _interval_cell(row["trend"]),
            row["verdict"],
            _interval_cell(row["gap"]) if "gap" in row else "(reference)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if reading["unread"]:
        lines += ["", "Not read: " + "; ".join(f"{label} ({why})" for label, why in reading["unread"].items()) + "."]
    treatments = treatment_markdown(reading.get("treatments") or [], _WINDOW_TREATMENT_INTRO)
    if treatments:
        lines += ["", treatments.rstrip("\n")]
    return "\n".join(lines) + "\n"
