"""Has the comparison stopped moving? Each row of a longer-budget study against the same row, seed and patients of a
shorter one (``splitunet compare-budgets``).

A comparison is a result only at a budget where more training no longer changes its figures. Two ``splitunet
compare`` reports that differ in nothing but the budget (``steps``, ``rounds``) answer that: for every row and seed
both ran, the change of mean Dice from the shorter to the longer budget is paired (same patients, same held-out
cases, same initialisation), and its 95 % Student's t interval over seeds
(:func:`splitunet.evaluation.intervals.t_interval`) says what the seeds allow:

* **still moving** (rising or falling): the interval excludes 0;
* **settled**: the whole interval lies within ``±tolerance`` (2 Dice points by default), an equivalence reading:
  a narrow interval around 0, not merely one that contains it;
* **not shown either way**: the interval contains 0 but is wider than the tolerance: the seeds disagree too much;
* **too few seeds to say**: fewer than two paired seeds.

The same reading is given for each row's gap to the reference row (the figure the comparison's table reports), since
a row can keep improving while its gap to the reference has settled.

The shorter budget need not be a study of its own: a study run with ``curve_every`` scores every run at those steps
on the way, and :func:`budget_at` reads the report as if it had stopped at one of them. Under a constant learning
rate (the study's), the first ``n`` steps of a longer run are a run of ``n`` steps, rounds of the same length
included (bit for bit where the run is deterministic; with three or more hospitals FLARE sums their results in
arrival order, so two runs of a seed differ in rounding), so its curve stands for the shorter study
(``tests/e2e/test_compare_topologies.py`` checks that scoring on the way changes no figure). Whether a study
scored on the way is not what is compared: ``curve_every`` may differ.
DP-SGD rows are the exception: their noise is calibrated for the whole budget, so their curve is not the shorter
run, and they are left out of such a reading.

Plain data in, plain data out: the reports are ``compare.json`` as :func:`splitunet.evaluation.compare.run_compare`
writes it (``settings``, ``held_out``, ``rows`` with ``key``, ``label``, ``dice_by_seed``).
"""

from __future__ import annotations

from collections.abc import Mapping

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.intervals import interval_sign, t_interval
from splitunet.evaluation.utility import REGIONS, _interval_cell, _mean_dice

__all__ = [
    "BUDGET_FIELDS",
    "DEFAULT_TOLERANCE",
    "DP_ROW_NOT_READ",
    "budget_at",
    "budget_changes",
    "budget_markdown",
    "settle_verdict",
]

# The settings two reports may differ in; anything else differing makes the pairing meaningless.
BUDGET_FIELDS = ("steps", "rounds")
# Settings that change what a study records, not what it trains.
_RECORDING_FIELDS = ("curve_every",)
# 2 Dice points: below the seed-to-seed spread of a single run on the phantom, so "settled" is a real claim.
DEFAULT_TOLERANCE = 0.02
DP_ROW_NOT_READ = "DP-SGD: its noise was set for the whole budget, so its curve is not the shorter run"


def _budget(report: Mapping) -> dict:
    settings = report.get("settings") or {}
    return {field: settings.get(field, report.get(field)) for field in BUDGET_FIELDS}


def _check_comparable(shorter: Mapping, longer: Mapping) -> None:
    """Same study but for the budget: same settings otherwise, same reference, same held-out cases per seed."""
    first, second = shorter.get("settings") or {}, longer.get("settings") or {}
    differing = sorted(
        name
        for name in set(first) | set(second)
        if name not in BUDGET_FIELDS + _RECORDING_FIELDS and first.get(name) != second.get(name)
    )
    if differing:
        detail = ", ".join(f"{name}: {first.get(name)!r} against {second.get(name)!r}" for name in differing)
        raise SplitUNetConfigError(f"the two studies differ in more than the budget ({detail})")
    if shorter.get("reference") != longer.get("reference"):
        raise SplitUNetConfigError(
            f"the two studies have different reference rows ({shorter.get('reference')!r} against "
            f"{longer.get('reference')!r})"
        )
    seeds = set(shorter.get("held_out") or {}) & set(longer.get("held_out") or {})
    for seed in sorted(seeds, key=int):
        if shorter["held_out"][seed] != longer["held_out"][seed]:
            raise SplitUNetConfigError(
                f"seed {seed} holds out different cases in the two studies: not the same patients"
            )


def budget_at(report: Mapping, steps: int) -> dict:
    """A ``compare.json`` report read as if its study had stopped after ``steps`` steps: each row's Dice by seed at
    that point of its runs' learning curves (a study run with ``curve_every``), the rounds in proportion.

    Returns:
        a report :func:`budget_changes` takes (``settings`` with this budget, ``reference``, ``held_out``, ``rows``
        with ``key``, ``label``, ``dice_by_seed``), and ``left_out``: the labels of DP-SGD rows, whose noise was set
        for the whole budget (their first ``steps`` steps are not a run of ``steps``).

    Raises:
        SplitUNetConfigError: a run of the report was not scored at ``steps``, or ``steps`` is not a round boundary.
    """
    settings = dict(report.get("settings") or {})
    total, rounds = int(settings.get("steps", report.get("steps"))), settings.get("rounds", report.get("rounds"))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= total:
        raise SplitUNetConfigError(f"a budget of {steps!r} steps is not within the study's {total}")
    if rounds and (steps * int(rounds)) % total:
        raise SplitUNetConfigError(f"{steps} steps end inside a round of the study's {rounds} rounds of {total} steps")
    runs = report.get("runs") or {}
    rows, left_out = [], []
    for row in report["rows"]:
        if row.get("target_epsilon") is not None:
            left_out.append(row["label"])
            continue
        by_seed = {}
        for seed in row["dice_by_seed"]:
            curve = (runs.get(row["key"], {}).get(seed) or {}).get("curve") or []
            point = next((point for point in curve if point["iteration"] == steps), None)
            if point is None:
                scored = [point["iteration"] for point in curve]
                raise SplitUNetConfigError(
                    f"{row['label']}, seed {seed}: its run was scored at steps {scored or [total]}, not at {steps} "
                    "(run the study with curve_every)"
                )
            by_seed[seed] = point["dice"]
        rows.append({"key": row["key"], "label": row["label"], "dice_by_seed": by_seed})
    settings["steps"] = steps
    if rounds:
        settings["rounds"] = int(rounds) * steps // total
    return {
        "settings": settings,
        "steps": steps,
        "rounds": settings.get("rounds"),
        "reference": report.get("reference"),
        "held_out": report.get("held_out"),
        "rows": rows,
        "left_out": left_out,
    }


def settle_verdict(interval: Mapping, tolerance: float = DEFAULT_TOLERANCE) -> str:
    """What a paired change's interval allows one to say about a budget (see the module's docstring)."""
    side = interval_sign(interval)
    if side is None:
        return "too few seeds to say"
    if side:
        return "still rising" if side > 0 else "still falling"
    if -tolerance <= interval["low"] and interval["high"] <= tolerance:
        return "settled"
    return "not shown either way"


def budget_changes(shorter: Mapping, longer: Mapping, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The paired change of every row from the shorter budget to the longer one.

    Args:
        shorter: the ``compare.json`` report of the shorter budget.
        longer: the report of the longer budget (its row order is kept).
        tolerance: half-width, in Dice (0.02: 2 points), within which a whole interval counts as settled.

    Returns:
        ``shorter`` and ``longer`` (their budgets), ``tolerance``, ``reference`` (its label), and ``rows``: one per
        row of ``longer`` that ``shorter`` also has, with ``key``, ``label``, ``seeds`` (those both studies ran),
        ``mean_dice`` (seed -> ``[shorter, longer]``), ``change`` (``mean`` and each region: ``t_interval`` of
        longer minus shorter), ``gap_change`` (the same for the row's mean-Dice gap to the reference row; absent
        for the reference itself) and their verdicts; ``unread``: label -> why a row of either study has no line
        (a DP-SGD row that :func:`budget_at` left out, or a row that only one study ran).

    Raises:
        SplitUNetConfigError: the reports differ in more than the budget, in their reference row, or in a seed's
            held-out cases.
    """
    _check_comparable(shorter, longer)
    before = {row["key"]: row["dice_by_seed"] for row in shorter["rows"]}
    after_rows = list(longer["rows"])
    reference_key = after_rows[0]["key"] if after_rows else None
    rows = []
    unread = {label: DP_ROW_NOT_READ for label in shorter.get("left_out", [])}
    after_keys = {row["key"] for row in after_rows}
    for row in shorter["rows"]:
        if row["key"] not in after_keys:
            unread[row["label"]] = "only in the shorter study"
    for row in after_rows:
        key = row["key"]
        if key not in before:
            unread.setdefault(row["label"], "only in the longer study")
            continue
        old, new = before[key], row["dice_by_seed"]
        seeds = sorted(set(old) & set(new), key=int)
        change = {
            region: t_interval([float(new[s][region]) - float(old[s][region]) for s in seeds]) for region in REGIONS
        }
        change["mean"] = t_interval([_mean_dice(new[s]) - _mean_dice(old[s]) for s in seeds])
        entry = {
            "key": key,
            "label": row["label"],
            "seeds": [int(s) for s in seeds],
            "mean_dice": {s: [_mean_dice(old[s]), _mean_dice(new[s])] for s in seeds},
            "change": change,
            "verdict": settle_verdict(change["mean"], tolerance),
        }
        if key != reference_key and reference_key in before:
            old_ref, new_ref = before[reference_key], after_rows[0]["dice_by_seed"]
            paired = [s for s in seeds if s in old_ref and s in new_ref]
            entry["gap_change"] = t_interval(
                [
                    (_mean_dice(new[s]) - _mean_dice(new_ref[s])) - (_mean_dice(old[s]) - _mean_dice(old_ref[s]))
                    for s in paired
                ]
            )
            entry["gap_verdict"] = settle_verdict(entry["gap_change"], tolerance)
        rows.append(entry)
    return {
        "shorter": _budget(shorter),
        "longer": _budget(longer),
        "tolerance": tolerance,
        "reference": longer.get("reference"),
        "rows": rows,
        "unread": unread,
    }


def _budget_text(budget: Mapping) -> str:
    rounds = f", {budget['rounds']} rounds" if budget.get("rounds") else ""
    return f"{budget['steps']} steps{rounds}"


def budget_markdown(changes: Mapping) -> str:
    """The table of :func:`budget_changes`: per row, each seed's mean Dice at both budgets, the paired changes in
    Dice points with their 95 % intervals, and the verdicts."""
    shorter, longer = _budget_text(changes["shorter"]), _budget_text(changes["longer"])
    points = 100 * changes["tolerance"]
    lines = [
        f"Each row at {longer} against the same row, seed and patients at {shorter}: change of Dice in points "
        f"(longer minus shorter), mean over the seeds both ran [95 % t interval]. 'settled': the whole interval of "
        f"the mean-Dice change lies within ±{points:g} points; 'still rising'/'still falling': it excludes 0; "
        f"'not shown either way': it holds 0 but is wider than ±{points:g}. The gap columns give, read the same way, "
        f"the change of each row's mean-Dice gap to '{changes['reference']}'.",
        "",
        f"| topology | seeds | mean Dice by seed ({shorter} → {longer}) | Δ mean Dice | Δ TC | Δ WT | Δ ET | verdict "
        "| Δ gap to reference | gap verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in changes["rows"]:
        change = row["change"]
        by_seed = "; ".join(f"{seed}: {a:.3f} → {b:.3f}" for seed, (a, b) in row["mean_dice"].items()) or "-"
        cells = [
            row["label"],
            ", ".join(str(seed) for seed in row["seeds"]) or "-",
            by_seed,
            _interval_cell(change["mean"]),
            *(_interval_cell(change[region]) for region in REGIONS),
            row["verdict"],
            _interval_cell(row["gap_change"]) if "gap_change" in row else "(reference)",
            row.get("gap_verdict", "-"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    unread = changes.get("unread") or {}
    if unread:
        lines += ["", "Not read: " + "; ".join(f"{label} ({why})" for label, why in unread.items()) + "."]
    return "\n".join(lines) + "\n"
