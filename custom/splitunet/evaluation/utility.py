"""``splitunet utility``: what a job costs in Dice, measured so that it means something: every setting trained for the
same budget on the same phantom split under several paired seeds, reported as the mean and a 95 % interval of the
paired difference against the first setting (the float32 reference).

Seed ``s`` draws the phantom cases and derives, in their data folder, the case-key secret, which sets the case split
and the crop sequence (:func:`~splitunet.evaluation.sweep.seeded_secret`): every setting of seed ``s`` trains on the
same data, split and crops, on any machine, so the settings differ only in what they do (the decoder starts from the
job's seed, the sites from private seeds of their own). The
interval is Student's t over the per-seed differences. The validation
Dice at every ``val_every`` shows whether the numbers had stopped moving by the end of the budget.

Each run keeps its ``results.json``; a rerun with the same out folder and budget reuses finished runs, so a long
study can be stopped and continued. The rows of an earlier ``utility.json`` (``--reuse``: same budget, same
optimiser, same derived secrets) are taken over per seed without their runs, so that a study adds a setting without
training the others again: the pairing is by seed, and the earlier runs of a seed trained on the same data, split
and crops as the new ones.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.evaluation.intervals import t_interval
from splitunet.evaluation.sweep import SweepSetting, seeded_secret
from splitunet.networks.optimizer import OPTIMIZER_NAME, trained_by_this_optimizer
from splitunet.tools.demo import DemoSettings, run_demo
from splitunet.tools.deployment import find_job

__all__ = [
    "UTILITY_SETTINGS",
    "UTILITY_ITERATIONS",
    "UTILITY_SEEDS",
    "REGIONS",
    "run_utility",
    "reusable_runs",
    "summarise_utility",
    "utility_markdown",
    "paired_interval",
]

REGIONS = ("TC", "WT", "ET")
# 300 iterations: at 80 the undefended run's TC was still 0.02 and runs swung by tens of points.
UTILITY_ITERATIONS = 300
UTILITY_SEEDS = (0, 1, 2)
# Validations along the way: the curve that shows whether the budget was enough.
_VAL_EVERY = 100
# A 300-iteration run takes about 12 min alone on 2 CPU cores, but went past the demo's 30 min limit beside a sweep
# and a test run: a study stops a run only when it is surely stuck.
_RUN_TIMEOUT_S = 3 * 3600.0

UTILITY_SETTINGS = (
    SweepSetting("float32 (reference)", "split_unet_fp32"),
    SweepSetting("int8 (the main job)", "split_unet"),
    SweepSetting("protected preset", "split_unet_protected"),
    SweepSetting(
        "protected, x0 and x1 withheld",
        "split_unet_protected",
        {"BlockSkipLevels": {"levels": [0, 1]}},
        {"skip_levels": [2, 3]},
    ),
    # The main job with gradients applied one step late: its Dice against the int8 row is the pipelining's cost.
    SweepSetting("int8, pipelined (delay 1)", "split_unet_pipelined"),
    # NoPeek's cost against the float32 reference it is built on.
    SweepSetting("NoPeek 0.1", "split_unet_nopeek"),
)

# The tiny configuration of ``--quick`` (seconds a run): it checks the pipeline, its figures mean nothing.
_QUICK_DEMO = {"cases": 6, "shape": (40, 40, 40)}
_QUICK_SERVER_ARGS = {
    "crop_size": [32, 32, 32],
    "features": [4, 8, 8, 16, 16, 4],
    "num_val_cases": 2,
}


def paired_interval(values: Sequence[float]) -> dict:
    """Mean and 95 % Student's t interval of paired differences (one per seed): :func:`t_interval`.

    Returns:
        ``{"mean", "low", "high", "n"}``; the bounds are NaN with fewer than 2 values.
    """
    return t_interval(values)


def _mean_dice(dice: Mapping[str, float]) -> float:
    return statistics.fmean(float(dice[region]) for region in REGIONS)


def _run_dir(out_dir: Path, seed: int, setting: SweepSetting) -> Path:
    # Named by the label, not the position, so that a study run again with more settings reuses the finished ones.
    slug = "".join(c if c.isalnum() else "_" for c in setting.label.lower()).strip("_")
    return out_dir / f"seed{seed}" / f"{setting.job}__{slug}"


def _finished(run_dir: Path, iterations: int) -> dict | None:
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    same_run = summary.get("iterations") == iterations and trained_by_this_optimizer(summary)
    return summary if same_run and summary.get("simulator_exit_code") == 0 else None


def reusable_runs(
    reuse: str | Path | None, iterations: int, fingerprints: Mapping[int, str]
) -> dict[str, dict[int, dict]]:
    """The runs of an earlier ``utility.json``, by setting key and seed, as :func:`summarise_utility` reads them.

    A reused run keeps its Dice, its validation curve (its own where the report kept one per seed, else its row's
    mean curve), bytes and seconds; it is marked ``"reused_from"``. Only seeds whose data fingerprint (the derived
    case-key secret's) is this study's are taken over: another secret split and cropped the cases otherwise.

    Args:
        reuse: the earlier ``utility.json`` (``None``: nothing is reused).
        iterations: this study's budget.
        fingerprints: this study's data fingerprint by seed.

    Raises:
        ValueError: the report was made with another budget or optimiser, or keyed a seed's cases with another
            secret (named).
    """
    if not reuse:
        return {}
    earlier = json.loads(Path(reuse).read_text())
    if earlier.get("iterations") != iterations or earlier.get("optimizer") != OPTIMIZER_NAME:
        raise ValueError(
            f"{reuse} was made at {earlier.get('iterations')} iterations with optimiser "
            f"{earlier.get('optimizer', 'Adam, coupled weight decay')!r}; this study trains {iterations} with "
            f"{OPTIMIZER_NAME!r}: its rows cannot be reused"
        )
    theirs = earlier.get("data_fingerprints") or {}
    mismatched = [seed for seed in fingerprints if str(seed) in theirs and theirs[str(seed)] != fingerprints[seed]]
    unknown = [seed for seed in fingerprints if str(seed) not in theirs]
    if mismatched or unknown:
        raise ValueError(
            f"{reuse} keyed the cases of seeds {sorted(mismatched + unknown)} with another or an unrecorded secret: "
            "its runs were split and cropped otherwise than this study's, they cannot be paired with them"
        )
    runs: dict[str, dict[int, dict]] = {}
    for row in earlier["rows"]:
        key = SweepSetting.from_row(row).key()
        seconds = dict(zip(row["seeds"], row.get("seconds_per_run") or []))
        curves = row.get("curve_by_seed") or {}
        for seed_text, dice in row["dice_by_seed"].items():
            if int(seed_text) not in fingerprints:
                continue
            curve = curves.get(seed_text, row.get("mean_dice_at_validation") or {})
            runs.setdefault(key, {})[int(seed_text)] = {
                "dice": dice,
                "mean_dice_curve": {int(i): float(value) for i, value in curve.items()},
                "activation_bytes_per_iteration": row.get("activation_bytes_per_iteration"),
                "elapsed_s": seconds.get(int(seed_text)),
                "reused_from": str(reuse),
            }
    return runs


def run_utility(
    out_dir: str | Path,
    settings: Sequence[SweepSetting] = UTILITY_SETTINGS,
    seeds: Sequence[int] = UTILITY_SEEDS,
    iterations: int = UTILITY_ITERATIONS,
    quick: bool = False,
    capture_iterations: Sequence[int] = (),
    reuse: str | Path | None = None,
) -> dict:
    """Train every setting under every seed; write ``utility.json`` and ``utility.md``.

    Args:
        out_dir: the study's folder (one data folder per seed, one workspace per run, the tables).
        settings: the runs; the first is the reference of the paired differences.
        seeds: paired seeds (at least 3 for an interval worth reading).
        iterations: training iterations per run.
        quick: the tiny configuration (tests); its figures mean nothing.
        capture_iterations: iterations whose activations and gradients each run captures for ``splitunet leakage``.
        reuse: an earlier ``utility.json`` whose runs are taken over (:func:`reusable_runs`); finished runs in
            ``out_dir`` still come first.

    Returns:
        the summary written to ``utility.json``.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    fingerprints = {}
    for seed in seeds:
        (out_dir / f"data_seed{seed}").mkdir(parents=True, exist_ok=True)
        fingerprints[seed] = seeded_secret(out_dir / f"data_seed{seed}", seed, study="utility")
    earlier = reusable_runs(reuse, iterations, fingerprints)
    runs: dict[str, dict[int, dict]] = {setting.label: {} for setting in settings}
    for seed in seeds:
        data_dir = out_dir / f"data_seed{seed}"
        for setting in settings:
            run_dir = _run_dir(out_dir, seed, setting)
            summary = _finished(run_dir, iterations) or earlier.get(setting.key(), {}).get(seed)
            if summary is None:
                print(f"\n=== seed {seed}: {setting.label} ({setting.job}), {iterations} iterations ===", flush=True)
                server_args = {
                    **(_QUICK_SERVER_ARGS if quick else {}),
                    "num_iterations": iterations,
                    "val_every": min(_VAL_EVERY, iterations),
                    **setting.server_args,
                }
                summary = run_demo(
                    run_dir,
                    DemoSettings(
                        seed=seed,
                        server_args=server_args,
                        filter_args=setting.filter_args,
                        client_args=setting.client_args,
                        capture_iterations=capture_iterations,
                        timeout_s=_RUN_TIMEOUT_S,
                        **(_QUICK_DEMO if quick else {}),
                    ),
                    job_dir=find_job(setting.job),
                    data_dir=data_dir,
                )
            runs[setting.label][seed] = summary
            write_json_atomic(
                summarise_utility(settings, runs, seeds, iterations, fingerprints), out_dir / "utility.json"
            )
    report = summarise_utility(settings, runs, seeds, iterations, fingerprints)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(report, out_dir / "utility.json")
    (out_dir / "utility.md").write_text(utility_markdown(report))
    return report


def _history(summary: Mapping) -> dict[int, float]:
    """Mean Dice at each validation of a run: ``{iteration: mean of TC, WT, ET}``."""
    if "mean_dice_curve" in summary:  # a run taken over from an earlier report
        return dict(summary["mean_dice_curve"])
    points = {}
    for entry in summary.get("history") or []:
        dice = entry.get("dice") if isinstance(entry, Mapping) else None
        if dice and all(region in dice for region in REGIONS):
            points[int(entry["iteration"])] = _mean_dice(dice)
    return points


def summarise_utility(
    settings: Sequence[SweepSetting],
    runs: Mapping[str, Mapping[int, Mapping]],
    seeds: Sequence[int],
    iterations: int,
    fingerprints: Mapping[int, str] | None = None,
) -> dict:
    """Per setting: Dice per seed, their mean, the paired difference to the first setting with its interval, the
    validation curve (mean over seeds), bytes and seconds per iteration; and the data fingerprint of each seed (what
    ``--reuse`` checks)."""
    reference = settings[0].label
    rows = []
    for setting in settings:
        mine = runs.get(setting.label, {})
        paired = [seed for seed in seeds if seed in mine and seed in runs.get(reference, {})]
        row = {
            **setting.to_row(),
            "seeds": sorted(mine),
            "dice_by_seed": {str(seed): mine[seed]["dice"] for seed in sorted(mine)},
            "dice_mean": {
                region: statistics.fmean(float(mine[s]["dice"][region]) for s in mine) if mine else math.nan
                for region in REGIONS
            },
        }
        row["difference_to_reference"] = {
            region: paired_interval(
                [float(mine[s]["dice"][region]) - float(runs[reference][s]["dice"][region]) for s in paired]
            )
            for region in REGIONS
        }
        row["difference_to_reference"]["mean"] = paired_interval(
            [_mean_dice(mine[s]["dice"]) - _mean_dice(runs[reference][s]["dice"]) for s in paired]
        )
        curves = {s: _history(mine[s]) for s in sorted(mine)}
        shared = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
        row["mean_dice_at_validation"] = {str(i): statistics.fmean(c[i] for c in curves.values()) for i in shared}
        # Each run's own curve, so that a later study that reuses this row keeps it.
        row["curve_by_seed"] = {str(s): {str(i): value for i, value in sorted(c.items())} for s, c in curves.items()}
        byte_counts = [mine[s].get("activation_bytes_per_iteration") for s in mine]
        byte_counts = [b for b in byte_counts if b]
        row["activation_bytes_per_iteration"] = byte_counts[0] if byte_counts else None
        row["seconds_per_run"] = [mine[s].get("elapsed_s") for s in sorted(mine)]
        rows.append(row)
    return {
        "iterations": iterations,
        "seeds": list(seeds),
        "reference": reference,
        "optimizer": OPTIMIZER_NAME,
        "data_fingerprints": {str(seed): value for seed, value in (fingerprints or {}).items()},
        "rows": rows,
    }


def _interval_cell(interval: Mapping, scale: float = 100.0, spec: str = "+.1f") -> str:
    """``mean [low, high]`` of a :func:`t_interval`, scaled (default: a Dice difference in signed points)."""
    if not math.isfinite(interval.get("mean", math.nan)):
        return "-"
    if not math.isfinite(interval.get("low", math.nan)):
        return f"{scale * interval['mean']:{spec}}"
    return f"{scale * interval['mean']:{spec}} [{scale * interval['low']:{spec}}, {scale * interval['high']:{spec}}]"


def utility_markdown(report: Mapping) -> str:
    """The table: Dice per region (mean over seeds), the paired difference to the reference in Dice points with its
    95 % interval, the mean Dice at each validation, and bytes."""
    rows = report["rows"]
    reference_bytes = rows[0].get("activation_bytes_per_iteration") if rows else None
    validations = sorted({int(i) for row in rows for i in row["mean_dice_at_validation"]})
    lines = [
        f"{report['iterations']} iterations, paired seeds {report['seeds']}; differences are in Dice points against "
        f"'{report['reference']}', mean over seeds [95 % t interval].",
        "",
        "| setting | Dice TC | Dice WT | Dice ET | Δ mean Dice (points) | Δ TC | Δ WT | Δ ET | "
        + " | ".join(f"mean Dice @{i}" for i in validations)
        + " | activation bytes / iteration (vs reference) |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(validations) + "---|",
    ]
    for row in rows:
        difference = row["difference_to_reference"]
        dice = row["dice_mean"]
        curve = " | ".join(
            f"{row['mean_dice_at_validation'][str(i)]:.3f}" if str(i) in row["mean_dice_at_validation"] else "-"
            for i in validations
        )
        size = row.get("activation_bytes_per_iteration")
        size_text = "-"
        if size:
            ratio = f" ({size / reference_bytes:.3f}x)" if reference_bytes else ""
            size_text = f"{size / 1e6:.2f} MB{ratio}"
        lines.append(
            f"| {row['label']} | {dice['TC']:.3f} | {dice['WT']:.3f} | {dice['ET']:.3f} | "
            f"{_interval_cell(difference['mean'])} | {_interval_cell(difference['TC'])} | "
            f"{_interval_cell(difference['WT'])} | {_interval_cell(difference['ET'])} | {curve} | {size_text} |"
        )
    seeds = [str(seed) for seed in report["seeds"]]
    # Each seed's own figure: how far runs of one setting swing is what the intervals above summarise.
    lines += [
        "",
        "Mean Dice (TC, WT, ET) of each run at the last validation, by seed:",
        "",
        "| setting | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for row in rows:
        by_seed = row.get("dice_by_seed", {})
        cells = (f"{_mean_dice(by_seed[seed]):.3f}" if seed in by_seed else "-" for seed in seeds)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    run_seconds = [t for row in rows for t in row.get("seconds_per_run", []) if t]
    if run_seconds:
        # The runs' own times, not this call's: a study resumed over several calls reuses finished runs.
        lines += ["", f"{len(run_seconds)} runs, {sum(run_seconds) / 60:.0f} min of training and validation in all."]
    return "\n".join(lines) + "\n"
