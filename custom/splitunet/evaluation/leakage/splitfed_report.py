"""What ``splitunet leakage-splitfed`` reports: crops pooled over a modality's sites, intervals, verdicts, markdown.

Inversion rows (one per site, attacked iteration and attack) are pooled per modality, per attacked round and over
every round, scored as ``splitunet leakage-u-shape`` scores them
(:func:`~splitunet.evaluation.leakage.u_shape_report.pooled_scores`): the brain-mask SSIM with a 95 % Student's t
interval over crops, the mean-image prior's SSIM, the leak reported (the larger of the two: an attack below the prior
has failed, not been stopped) and the gain over the prior per crop, with its interval. What the averages give the
server beyond the architecture it has in the plain vertical job is the per-crop difference between each attack that
uses them and ``unsplit`` on the same crops (:func:`advantage_over_architecture`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from splitunet.evaluation.intervals import t_interval
from splitunet.evaluation.leakage.u_shape_report import format_interval, pooled_scores
from splitunet.wire.protocol import MODALITIES

__all__ = [
    "ALL_ROUNDS",
    "pool_inversion",
    "advantage_over_architecture",
    "splitfed_summary",
    "splitfed_markdown",
]

# The pooled entry of every attacked round.
ALL_ROUNDS = "all"
# The attack that needs no average: the server's position in the plain vertical job.
ARCHITECTURE_ONLY = "unsplit"
_NAMES = {
    "white_box": "through the average, 0 local steps",
    "white_box_stale": "through the stale average",
    "white_box_next_upload": "through the site's next upload, one step later",
    "unsplit_from_average": "UnSplit surrogate from the average",
    "unsplit": "UnSplit, architecture only",
}


def _span(values: Sequence) -> list | None:
    values = [v for v in values if v is not None]
    return [min(values), max(values)] if values else None


def _range(values: Sequence[float], sign: str = "") -> str:
    """``0.61`` for one value (or equal ones after rounding), ``0.58 to 0.66`` for a range (``sign="+"``: signed;
    ``"d"``: integers)."""
    spec = "d" if sign == "d" else f"{sign}.2f"
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low} to {high}"


def _attack_order(rows: Sequence[Mapping]) -> dict[str, int]:
    """Attacks in the order the rows first name them (the order the attacks ran)."""
    order: dict[str, int] = {}
    for row in rows:
        order.setdefault(row["attack"], len(order))
    return order


def pool_inversion(rows: Sequence[Mapping]) -> list[dict]:
    """One entry per ``(averaging, attack, modality)``, the crops of the modality's sites pooled; with several attacked
    rounds also one per ``(attack, modality)`` over all of them (``"averaging": "all"``).

    Returns:
        ``{"averaging", "attack", "modality", "sites", "local_steps" ([min, max]), "steps_off" ([min, max] Adam steps
        between the encoder behind the activations and the one the attack starts from, ``None`` for the architecture
        alone)}`` plus :func:`~splitunet.evaluation.leakage.u_shape_report.pooled_scores`.
    """
    order = _attack_order(rows)
    rounds = sorted({row["averaging"] for row in rows})
    keys = [lambda row: row["averaging"]] + ([lambda row: ALL_ROUNDS] if len(rounds) > 1 else [])
    pooled = []
    for round_of in keys:
        groups: dict[tuple, list[Mapping]] = {}
        for row in rows:
            groups.setdefault((round_of(row), row["attack"], row["modality"]), []).append(row)
        for (averaging, attack, modality), members in groups.items():
            crops: dict[str, list[float]] = {}
            for row in members:
                for name, values in row["per_crop"].items():
                    crops.setdefault(name, []).extend(values)
            entry = {
                "averaging": averaging,
                "attack": attack,
                "modality": modality,
                "sites": sorted({row["site"] for row in members}),
                "local_steps": _span([row["local_steps"] for row in members]),
                "steps_off": _span([row.get("steps_off") for row in members]),
            }
            entry.update(pooled_scores(crops))
            pooled.append(entry)

    def sort_key(entry):
        averaging = entry["averaging"]
        return (averaging == ALL_ROUNDS, 0 if averaging == ALL_ROUNDS else averaging, order[entry["attack"]],
                MODALITIES.index(entry["modality"]))  # fmt: skip

    return sorted(pooled, key=sort_key)


def advantage_over_architecture(rows: Sequence[Mapping], key: str = "ssim_brain") -> list[dict]:
    """Per attack that uses an average or an upload and per modality: its per-crop ``key`` minus that of
    ``unsplit`` on the same crops (same site and iteration), pooled over every round.

    Returns:
        ``{"attack", "modality", "crops", "difference" (t interval)}``, empty without ``unsplit`` rows.
    """
    baseline = {(r["site"], r["iteration"]): r["per_crop"][key] for r in rows if r["attack"] == ARCHITECTURE_ONLY}
    order = _attack_order(rows)
    differences: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        reference = baseline.get((row["site"], row["iteration"]))
        if row["attack"] == ARCHITECTURE_ONLY or reference is None:
            continue
        pairs = [(a, b) for a, b in zip(row["per_crop"][key], reference) if math.isfinite(a) and math.isfinite(b)]
        differences.setdefault((row["attack"], row["modality"]), []).extend(a - b for a, b in pairs)
    entries = [
        {"attack": attack, "modality": modality, "crops": len(values), "difference": t_interval(values)}
        for (attack, modality), values in differences.items()
    ]
    return sorted(entries, key=lambda e: (order[e["attack"]], MODALITIES.index(e["modality"])))


def _overall(pooled: Sequence[Mapping]) -> list[Mapping]:
    """The entries over every round (or the one round's)."""
    everything = [e for e in pooled if e["averaging"] == ALL_ROUNDS]
    return everything or list(pooled)


def _verdicts(pooled: Sequence[Mapping], advantage: Sequence[Mapping]) -> dict[str, str]:
    overall = _overall(pooled)
    verdicts = {}

    def of(attack):
        return [e for e in overall if e["attack"] == attack]

    def shown(entries, interval=lambda e: e["gain_brain"]) -> str:
        if any(interval(e)["n"] < 2 for e in entries):
            return "one crop per modality, so no interval"
        if all(interval(e)["low"] > 0 for e in entries):
            return "every interval above zero"
        above = sum(interval(e)["low"] > 0 for e in entries)
        return f"{above} of {len(entries)} modalities with the interval above zero"

    start = of("white_box")
    if start:
        ssim = [e["ssim_brain"]["mean"] for e in start]
        prior = [e["ssim_prior_brain"] for e in start]
        verdicts["round_start"] = (
            f"At each site's first activations after an average the server inverts them through the average it "
            f"computed: brain SSIM {_range(ssim)} over the modalities (prior {_range(prior)}); gain over the prior: "
            f"{shown(start)}."
        )
    parts = []
    for attack in ("white_box_stale", "white_box_next_upload", "unsplit_from_average", "unsplit"):
        entries = of(attack)
        if not entries:
            continue
        gains = [e["gain_brain"]["mean"] for e in entries]
        parts.append(f"{attack} ({_NAMES[attack]}) gains {_range(gains, '+')} over the prior ({shown(entries)})")
    if parts:
        steps = _span([s for e in overall if e["attack"] != "white_box" for s in (e["local_steps"] or [])])
        verdicts["within_round"] = (
            f"At each site's last activations of a round ({_steps(steps)} local steps after the average): "
            + "; ".join(parts)
            + "."
        )
    if advantage:
        lines = []
        for attack in dict.fromkeys(e["attack"] for e in advantage):
            mine = [e for e in advantage if e["attack"] == attack]
            means = [e["difference"]["mean"] for e in mine]
            lines.append(f"{attack} {_range(means, '+')} ({shown(mine, lambda e: e['difference'])})")
        verdicts["over_architecture"] = (
            "Against UnSplit from the architecture alone (the plain vertical job's server) on the same crops, brain "
            "SSIM per crop: " + "; ".join(lines) + "."
        )
    return verdicts


def splitfed_summary(report: Mapping) -> dict:
    """Pooled inversion entries, the advantage of the averages over the architecture alone, and the verdicts."""
    pooled = pool_inversion(report["inversion"])
    advantage = advantage_over_architecture(report["inversion"])
    return {"inversion": pooled, "over_architecture": advantage, "verdicts": _verdicts(pooled, advantage)}


def _cell(entry: Mapping | None) -> str:
    if entry is None:
        return "-"
    return (
        f"{entry['ssim_reported_brain']:.2f} ({entry['ssim_prior_brain']:.2f}; "
        f"{format_interval(entry['gain_brain'], '+')})"
    )


def _steps(span) -> str:
    if span is None:
        return "-"
    return str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"


def splitfed_markdown(report: Mapping) -> str:
    """The report as markdown: settings, the pooled and per-round tables, the checks and the verdicts."""
    settings, summary = report["settings"], report["summary"]
    overall = _overall(summary["inversion"])
    attacks = list(dict.fromkeys(e["attack"] for e in overall))
    view, run = report["server_view"], report["run"]
    crops = {e["attack"]: e["crops"] for e in overall}
    lines = [
        "# Leakage in SplitFed: what the server learns from the encoder averages",
        "",
        f"Job `{report['job']}` in the FLARE simulator: {settings['sites_per_modality']} sites per modality "
        f"({settings['sites_per_modality'] * len(MODALITIES)} in all, each group of four one cohort), "
        f"{settings['cases']} phantom patients of {'x'.join(map(str, settings['shape']))}, crops "
        f"{'x'.join(map(str, settings['crop_size']))}, batch {settings['batch_size']}, features "
        f"{settings['features']}, encoders averaged every {settings['every']} iterations, "
        f"{run['iterations']} iterations; attacked rounds after the averagings at {view['rounds_attacked']} "
        f"(captured whole). White-box {settings['white_box_iterations']} Adam steps, UnSplit "
        f"{settings['unsplit_iterations']} outer iterations, every inversion from the mean auxiliary image; level "
        f"attacked: the finest received ({', '.join(view['levels_received']) or '-'} received). "
        f"{report['elapsed_s']:.0f} s in all ({report['training_s']:.0f} s the simulator run).",
        "",
        "## Input inversion, every attacked round pooled",
        "",
        "Reported brain-mask SSIM, the larger of attack and prior (prior; gain over the prior per crop, mean and 95 % "
        "t interval). Crops per cell: " + ", ".join(f"{a} {n}" for a, n in crops.items()) + ".",
        "",
        "| attack | local steps | Adam steps off | " + " | ".join(MODALITIES) + " |",
        "|---|---|---|" + "---|" * len(MODALITIES),
    ]
    for attack in attacks:
        mine = {e["modality"]: e for e in overall if e["attack"] == attack}
        first = next(iter(mine.values()))
        lines.append(
            f"| `{attack}` | {_steps(first['local_steps'])} | {_steps(first['steps_off'])} | "
            + " | ".join(_cell(mine.get(m)) for m in MODALITIES)
            + " |"
        )
    if summary["over_architecture"]:
        lines += [
            "",
            "## What the averages add over the architecture alone",
            "",
            "Brain SSIM per crop minus that of `unsplit` (architecture only, the plain vertical job's server) on the "
            "same crops; mean and 95 % t interval.",
            "",
            "| attack | " + " | ".join(MODALITIES) + " |",
            "|---|" + "---|" * len(MODALITIES),
        ]
        for attack in dict.fromkeys(e["attack"] for e in summary["over_architecture"]):
            mine = {e["modality"]: e for e in summary["over_architecture"] if e["attack"] == attack}
            cells = [format_interval(mine[m]["difference"], "+") if m in mine else "-" for m in MODALITIES]
            lines.append(f"| `{attack}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per round",
        "",
        "| after averaging at | attack | modality | sites | crops | local steps | SSIM | prior | reported | gain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["inversion"]:
        if e["averaging"] == ALL_ROUNDS:
            continue
        lines.append(
            f"| {e['averaging']} | {e['attack']} | {e['modality']} | {', '.join(e['sites'])} | {e['crops']} | "
            f"{_steps(e['local_steps'])} | {format_interval(e['ssim_brain'])} | {e['ssim_prior_brain']:.2f} | "
            f"{e['ssim_reported_brain']:.2f} | {format_interval(e['gain_brain'], '+')} |"
        )
    averages, replay = report["averages"], report["replay"]
    if averages.get("checked"):
        average_line = (
            f"- The average the evaluator recomputes from the copies the server received equals the one it sent at "
            f"{len(averages['averagings'])} averagings: largest difference {averages['max_abs_difference']:.2g} "
            f"(tolerance {averages['tolerance']:.0e}): {'yes' if averages['matches'] else 'NO'}."
        )
    else:
        average_line = f"- Averages not recomputed: {averages['reason']}."
    dice = run.get("dice") or {}
    lines += [
        "",
        "## Checks",
        "",
        f"- What the server held: at the averagings after iterations {view['averagings']}, "
        f"{_range(list(view['copies_per_averaging'].values()), 'd')} encoder copies of {view['parameters_per_copy']} "
        f"parameters each (in the clear) and the averages it sent; activations of the attacked rounds "
        f"({sum(view['activation_captures'].values())} captures), levels {view['levels_received']}.",
        average_line,
        f"- The average the server sent, run on the evaluator's true crops, gives the received activations at "
        f"{sum(r['matches'] for r in replay.values())} of {len(replay)} first activations after an average (largest "
        f"error {max((r['max_abs_error'] for r in replay.values()), default=0):.2g}, one int8 step allowed): the "
        "sites ran exactly the average, and the truth is the crops they encoded.",
        f"- The run trained: final Dice {', '.join(f'{k} {v:.2f}' for k, v in dice.items())}.",
        "",
        "## Verdict",
        "",
    ]
    lines += [f"- {text}" for text in summary["verdicts"].values()]
    lines.append("")
    return "\n".join(lines)
