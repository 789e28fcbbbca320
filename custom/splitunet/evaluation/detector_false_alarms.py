"""``splitunet detector``: how often the site-side :class:`~splitunet.filters.GradientDetector` refuses honest
gradients over whole training runs.

Each seed trains the main job's model honestly in one process (the decoder and four site encoders with the job's
widths, learning rate, batch size and crop size, on the demo's phantom cases at seeded random crops) for the given
number of iterations. Every site runs its own detector, as in a deployment, in observing mode: each verdict is
recorded and every gradient applied, so that every iteration of the run is tested. A flag is a false alarm; the
report gives the rate with a 95 % Wilson interval, per site and pooled, and the first reason per seed.

Every call's statistics go to ``detector_calls.json`` beside the report, so that other bounds can be judged on
the same gradients without training again (:func:`replay_false_alarms`, ``splitunet detector --replay``): the
calibration picks bounds on some seeds and measures false alarms on the others.

The gradients are the float32 ones; the main job sends int8 codes, which the detector decodes before it judges, so
they differ from these by the quantisation error only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from splitunet.atomic_files import atomic_write_bytes, write_json_atomic
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.intervals import proportion_interval
from splitunet.evaluation.malicious_server import (
    detector_bounds,
    detector_gate,
    random_crops,
    run_honest,
    statistics_envelope,
)
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES

__all__ = ["measure_false_alarms", "replay_false_alarms", "false_alarm_markdown"]


def measure_false_alarms(
    parties: str | Path,
    out_dir: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    iterations: int = 300,
    batch_size: int = 2,
    crop_size: Sequence[int] = (48, 48, 48),
    crops: int = 48,
    config: SplitModelConfig | None = None,
    make_detector: Callable[[], object] | None = None,
) -> dict:
    """Honest runs with a detector at every site; write ``detector.json`` and ``detector.md`` in ``out_dir``.

    Args:
        parties: a partition (``flair/``, ``t1/``, ``t1gd/``, ``t2/``, ``labels/``), e.g. the demo's.
        out_dir: where the report goes.
        seeds: one honest run each (initialisation, crop origins and batch order).
        iterations: training iterations per run.
        batch_size: crops per iteration (the main job's 2).
        crop_size: crop size (the main job's 48^3).
        crops: distinct crops per run, drawn at seeded random origins and cycled through the cases.
        config: the model settings (default: the shipped job's, with the run's seed).
        make_detector: builds one site's detector (default: ``GradientDetector()`` with the shipped bounds).

    Returns:
        the report written to ``detector.json``.
    """
    from splitunet.data.party_data import LabelFolder, ModalityFolder
    from splitunet.filters import GradientDetector

    started = time.perf_counter()
    make_detector = make_detector or GradientDetector
    parties = Path(parties)
    folders = [ModalityFolder(parties / m, m, party=f"site-{i + 1}") for i, m in enumerate(MODALITIES)]
    labels = LabelFolder(parties / "labels", party="server")
    settings = {"seeds": list(seeds), "iterations": iterations, "batch_size": batch_size, "crop_size": list(crop_size)}
    out_dir = Path(out_dir)
    runs = []
    for seed in seeds:
        print(f"honest run, seed {seed}: {iterations} iterations", flush=True)
        images, targets = random_crops(folders, folders[0].case_ids, crops, crop_size, seed=seed, labels=labels)
        records = {site: [] for site in range(len(folders))}
        gates = {site: detector_gate(make_detector(), records[site], enforce=False) for site in records}
        run_config = config or SplitModelConfig(seed=seed)
        run_honest(images, targets, iterations, batch_size, config=run_config, seed=seed, gates=gates)
        runs += [_run(seed, site, record) for site, record in records.items()]
        _write_calls(settings, runs, out_dir)  # after every seed: a stopped study keeps the seeds it finished
    return _report(settings, runs, make_detector(), started, out_dir)


def _write_calls(settings: dict, runs: list, out_dir: Path) -> None:
    recorded = [
        {
            **{key: run[key] for key in ("seed", "site", "modality")},
            "calls": [{"iteration": c["iteration"], **(c["statistics"] or {})} for c in run["records"]],
        }
        for run in runs
    ]
    # Compact: 300 iterations x 4 sites x 3 seeds of ten numbers each.
    data = (json.dumps({**settings, "runs": recorded}, separators=(",", ":")) + "\n").encode("utf-8")
    atomic_write_bytes(out_dir / "detector_calls.json", lambda handle: handle.write(data))


def replay_false_alarms(
    calls_file: str | Path,
    out_dir: str | Path,
    make_detector: Callable[[], object] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict:
    """Judge the gradients a :func:`measure_false_alarms` run recorded again, with other bounds; same report.

    Each site's detector sees that site's calls in order, as it would have live: a refused call stays out of its
    drift baseline. Choose the bounds on some seeds and replay the others: their rate is a held-out false-alarm
    rate.

    Args:
        calls_file: the ``detector_calls.json`` a :func:`measure_false_alarms` run wrote.
        out_dir: where ``detector.json`` and ``detector.md`` go (not the recording's folder: it would be
            overwritten).
        make_detector: builds one site's detector (default: ``GradientDetector()`` with the shipped bounds).
        seeds: replay only these seeds (default: every recorded one).

    Returns:
        the report written to ``detector.json``.
    """
    from splitunet.filters import GradientDetector

    started = time.perf_counter()
    make_detector = make_detector or GradientDetector
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(calls_file).resolve().parent:
        raise SplitUNetConfigError(
            f"replay into another folder than {out_dir}: its detector.json is the recorded run's report"
        )
    recording = json.loads(Path(calls_file).read_text())
    chosen = [run for run in recording["runs"] if seeds is None or run["seed"] in set(seeds)]
    if not chosen:
        raise SplitUNetConfigError(f"{calls_file} holds no run of seeds {list(seeds or [])}")
    runs = []
    for recorded in chosen:
        detector, record = make_detector(), []
        for call in recorded["calls"]:
            if "level_ratio" not in call:  # malformed gradients: refused live, whatever the bounds
                statistics, reason = None, "malformed gradients (no statistics recorded)"
            else:
                statistics = {"level_ratio": call["level_ratio"], "dc_fraction": call["dc_fraction"]}
                reason = detector.judge(statistics)
                if reason is None:
                    detector.accept(statistics)
            record.append(
                {"iteration": call["iteration"], "flagged": reason is not None, "reason": reason,
                 "statistics": statistics}
            )  # fmt: skip
        site = int(recorded["site"].split("-")[1]) - 1
        runs.append(_run(recorded["seed"], site, record))
    settings = {
        "seeds": sorted({run["seed"] for run in chosen}),
        **{key: recording[key] for key in ("iterations", "batch_size", "crop_size")},
        "replayed_from": str(calls_file),
    }
    return _report(settings, runs, make_detector(), started, out_dir)


def _run(seed: int, site: int, record: list) -> dict:
    """One site's run: its counts and first reason (``records``: the calls, taken out before the report)."""
    flagged = [entry for entry in record if entry["flagged"]]
    return {
        "seed": seed,
        "site": f"site-{site + 1}",
        "modality": MODALITIES[site],
        "tested": len(record),
        "flagged": len(flagged),
        "flagged_iterations": [entry["iteration"] for entry in flagged],
        "first_reason": flagged[0]["reason"] if flagged else None,
        "records": record,
    }


def _report(settings: dict, runs: list, detector, started: float, out_dir: Path) -> dict:
    every_record = [entry for run in runs for entry in run.pop("records", [])]
    sites = sorted({run["site"] for run in runs})
    report = {
        **settings,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "by_site": {
            site: proportion_interval(
                sum(r["flagged"] for r in runs if r["site"] == site),
                sum(r["tested"] for r in runs if r["site"] == site),
            )
            for site in sites
        },
        "pooled": proportion_interval(sum(r["flagged"] for r in runs), sum(r["tested"] for r in runs)),
        # Where honest statistics lay, against the bounds in force: what a recalibration starts from.
        "envelope": statistics_envelope(every_record),
        "bounds": detector_bounds(detector),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(report, out_dir / "detector.json")
    (out_dir / "detector.md").write_text(false_alarm_markdown(report))
    return report


def _rate(interval: dict) -> str:
    return f"{100 * interval['rate']:.2f} % [{100 * interval['low']:.2f}, {100 * interval['high']:.2f}]"


def _end(value: float | None) -> str:
    return "open" if value is None else f"{value:g}"


def false_alarm_markdown(report: dict) -> str:
    """The false-alarm table of :func:`measure_false_alarms`."""
    lines = [
        f"Honest runs: seeds {', '.join(map(str, report['seeds']))}, {report['iterations']} iterations each, batch "
        f"{report['batch_size']}, crops {'x'.join(map(str, report['crop_size']))}; every site's detector observing."
        + (
            f" Replayed from `{report['replayed_from']}`: the recorded statistics judged again under the bounds below."
            if report.get("replayed_from")
            else ""
        ),
        "",
        "| site | gradient sets tested | refused | false-alarm rate [95 % Wilson] | first reason |",
        "|---|---|---|---|---|",
    ]
    for site, interval in report["by_site"].items():
        mine = [run for run in report["runs"] if run["site"] == site]
        reason = next((run["first_reason"] for run in mine if run["first_reason"]), None) or "-"
        flagged = sum(run["flagged"] for run in mine)
        lines.append(f"| {site} | {interval['n']} | {flagged} | {_rate(interval)} | {reason} |")
    pooled = report["pooled"]
    flagged = sum(run["flagged"] for run in report["runs"])
    lines.append(f"| all | {pooled['n']} | {flagged} | {_rate(pooled)} | |")
    envelope, bounds = report.get("envelope"), report.get("bounds")
    if envelope and bounds:
        lines += [
            "",
            f"Honest statistics over all {envelope['sets']} gradient sets, against the bounds in force (level ratio: "
            "log10 of the level's gradient RMS over x4's; DC share: the share of a level's gradient energy in its "
            "per-channel means):",
            "",
            "| level | ratio min | ratio 1st percentile | ratio median | ratio bound | DC share 99th percentile "
            "| DC share max | DC bound |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, ratio in envelope["level_ratio"].items():
            low, high = bounds["level_ratio"].get(key, [None, None])
            bound = "-" if low is None and high is None else f"[{_end(low)}, {_end(high)}]"
            dc = envelope["dc_fraction"].get(key, {})
            dc_bound = bounds["max_dc_fraction"].get(key)
            lines.append(
                f"| {key} | {ratio['min']:.2f} | {ratio['p01']:.2f} | {ratio['median']:.2f} | {bound} | "
                f"{dc.get('p99', math.nan):.4f} | {dc.get('max', math.nan):.4f} | "
                f"{'-' if dc_bound is None else f'{dc_bound:g}'} |"
            )
        if envelope.get("infinite"):
            lines += ["", f"Infinite ratios (an all-zero level or x4): {envelope['infinite']}."]
    lines += ["", f"Elapsed: {report['elapsed_s'] / 60:.1f} min ({report['threads']} threads)."]
    return "\n".join(lines) + "\n"
