"""``splitunet sweep``: train the demo configuration under each shipped defense at two strengths, attack every
run's captures, and tabulate what each defense costs (Dice, bytes) against what it protects (attack SSIM, label
Dice), with a trade-off plot.

All runs share the phantom cases, the case-key secret and the attacker's auxiliary cases, so differences are the
defenses' doing (up to the run-to-run variation of the random defenses, one run each).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.evaluation.defense_table import cost_cells, mean_dice
from splitunet.evaluation.leakage import AttackBudget, plot_tradeoff, run_leakage
from splitunet.evaluation.leakage.report import auxiliary_phantom
from splitunet.tools.demo import DemoSettings, run_demo
from splitunet.tools.deployment import find_job

__all__ = ["SweepSetting", "DEFAULT_SWEEP", "QUICK_SWEEP", "run_sweep", "sweep_markdown"]

# Iterations a sweep run trains by default: 13 runs and their attacks fit in an hour on 2 CPU cores.
SWEEP_ITERATIONS = 80
# Captured iterations: activations of 1 (encoders as initialised) and, with 2, the gradients for them.
_CAPTURE = (1, 2)


@dataclass(frozen=True)
class SweepSetting:
    """One run of the sweep: a shipped job, with filter or workflow arguments changed to set the strength.

    Args:
        label: row name.
        job: job name under ``jobs/``.
        filter_args: filter class name -> arguments to set (``copy_job_with_overrides``).
        server_args: workflow arguments to set (e.g. ``skip_levels`` to match blocked levels).
    """

    label: str
    job: str
    filter_args: dict = field(default_factory=dict)
    server_args: dict = field(default_factory=dict)


DEFAULT_SWEEP = (
    SweepSetting("no defense", "split_unet_fp32"),
    SweepSetting("activation noise σ 5e-4", "split_unet_noise"),
    SweepSetting("activation noise σ 2e-3", "split_unet_noise", {"ClippedGaussianNoise": {"noise_multiplier": 2e-3}}),
    SweepSetting("channel dropout 0.25", "split_unet_dropout"),
    SweepSetting("channel dropout 0.5", "split_unet_dropout", {"ChannelDropout": {"rate": 0.5}}),
    SweepSetting("top-k 10 %", "split_unet_topk"),
    SweepSetting("top-k 2 %", "split_unet_topk", {"TopKSparsify": {"fraction": 0.02}}),
    SweepSetting("int8 (the main job)", "split_unet"),
    SweepSetting("int2", "split_unet_int4", {"QuantizeFeatures": {"precision": "int2"}}),
    SweepSetting("x0 withheld", "split_unet_no_x0"),
    SweepSetting(
        "x0, x1 withheld", "split_unet_no_x0", {"BlockSkipLevels": {"levels": [0, 1]}}, {"skip_levels": [2, 3]}
    ),
    SweepSetting("gradient noise σ 5e-4", "split_unet_grad_noise"),
    SweepSetting(
        "gradient noise σ 5e-3", "split_unet_grad_noise", {"ClippedGaussianNoise": {"noise_multiplier": 5e-3}}
    ),
)

QUICK_SWEEP = (DEFAULT_SWEEP[0], DEFAULT_SWEEP[9])

# The tiny configuration of ``--quick`` (seconds a run): it checks the pipeline, its figures mean little.
_QUICK_DEMO = {"cases": 6, "shape": (40, 40, 40)}
_QUICK_SERVER_ARGS = {
    "num_iterations": 4,
    "crop_size": [32, 32, 32],
    "features": [4, 8, 8, 16, 16, 4],
    "val_every": 4,
    "num_val_cases": 2,
}


def run_sweep(
    out_dir: str | Path,
    settings: Sequence[SweepSetting] = DEFAULT_SWEEP,
    quick: bool = False,
    iterations: int = SWEEP_ITERATIONS,
    seed: int = 0,
) -> list[dict]:
    """Train, capture and attack each setting; write ``sweep.json``, ``sweep.md`` and ``tradeoff.png``.

    Args:
        out_dir: the sweep's folder (data, one workspace and leakage report per run, the table and plot).
        settings: the runs.
        quick: the tiny configuration and short attacks (tests).
        iterations: training iterations per run (ignored with ``quick``).
        seed: phantom and training seed.

    Returns:
        one row per setting.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    data_dir = out_dir / "data"
    budget = AttackBudget.quick() if quick else AttackBudget.sweep()
    demo = _QUICK_DEMO if quick else {}
    base_args = dict(_QUICK_SERVER_ARGS) if quick else {"num_iterations": iterations, "val_every": iterations}
    rows = []
    for index, setting in enumerate(settings):
        print(f"\n=== sweep {index + 1}/{len(settings)}: {setting.label} ({setting.job}) ===", flush=True)
        run_dir = out_dir / f"run_{index:02d}_{setting.job}"
        run_started = time.perf_counter()
        summary = run_demo(
            run_dir,
            DemoSettings(
                seed=seed,
                server_args={**base_args, **setting.server_args},
                filter_args=setting.filter_args,
                capture_iterations=_CAPTURE,
                **demo,
            ),
            job_dir=find_job(setting.job),
            data_dir=data_dir,
        )
        train_s = time.perf_counter() - run_started
        aux = auxiliary_phantom(data_dir, out_dir / "auxiliary")
        # The sweep judges each defense against the worst case: a server that knows the sites' initial encoders.
        report = run_leakage(
            run_dir, run_dir / "leakage", budget=budget, data_dir=data_dir, aux_dir=aux, assume_known_init=True
        )
        site_report = next(iter(report["sites"].values()))
        rows.append(
            {
                "label": setting.label,
                "job": setting.job,
                "filter_args": setting.filter_args,
                "server_args": setting.server_args,
                "dice": summary["dice"],
                "iterations": summary["iterations"],
                "activation_bytes_per_iteration": summary.get("activation_bytes_per_iteration"),
                "site": next(iter(report["sites"])),
                "levels_received": site_report["levels_received"],
                "inversion": site_report["inversion"],
                "best_inversion": site_report["best_inversion"],
                "label_inference": site_report["label_inference"],
                "train_s": round(train_s, 1),
                "attack_s": report["elapsed_s"],
                "report": str(run_dir / "leakage" / "report.md"),
            }
        )
        write_json_atomic({"rows": rows, "budget": budget.to_dict()}, out_dir / "sweep.json")
    points = [
        {
            "label": row["label"],
            "dice": mean_dice(row["dice"]),
            "ssim": row["best_inversion"]["ssim"],
            "ssim_prior": row["best_inversion"]["ssim_prior"],
        }
        for row in rows
        if row["best_inversion"]
    ]
    plot_tradeoff(points, out_dir / "tradeoff.png", f"Defenses after {rows[0]['iterations']} iterations (phantom)")
    elapsed = time.perf_counter() - started
    write_json_atomic(
        {"rows": rows, "budget": budget.to_dict(), "elapsed_s": round(elapsed, 1)}, out_dir / "sweep.json"
    )
    (out_dir / "sweep.md").write_text(sweep_markdown(rows, elapsed))
    return rows


def _cell(row: Mapping | None) -> str:
    return "-" if not row else f"{row['ssim']:.2f} / {row['psnr']:.1f}"


def sweep_markdown(rows: Sequence[Mapping], elapsed_s: float | None = None) -> str:
    """Two tables: what each setting costs and the best attack against it; then SSIM / PSNR per attack and level."""
    lines = [
        "Attacker's assumption: it knows every site's initial encoder (`--assume-known-init`, the worst case; "
        "sites keep a private encoder seed by default).",
        "",
        "| setting | Dice TC | Dice WT | Dice ET | mean Dice vs first row | activation MB / iteration (4 sites) "
        "| best attack on the site's crop | SSIM (prior) | PSNR dB (prior) "
        "| label-inference Dice (own image; random mask) | gain over own image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        best, labels = row["best_inversion"], row["label_inference"]
        attack = f"{best['attack']} {best['level']}" if best else "-"
        ssim = f"{best['ssim']:.2f} ({best['ssim_prior']:.2f})" if best else "-"
        psnr = f"{best['psnr']:.1f} ({best['psnr_prior']:.1f})" if best else "-"
        label, gain = "-", "-"
        if labels:
            own = labels.get("dice_own_image")
            own_text = "-" if own is None else f"{own:.2f}"
            label = f"{labels['dice']:.2f} ({own_text}; {labels['dice_random_mask']:.2f})"
            gain = "-" if own is None else f"{labels['gain_over_own_image']:+.2f}"
        lines.append(
            f"| {row['label']} | {cost_cells(row, rows[0], megabyte_digits=1)} | {attack} | {ssim} | {psnr} | {label} "
            f"| {gain} |"
        )
    columns = []
    for row in rows:
        for result in row["inversion"]:
            key = (result["attack"], result["level"])
            if key not in columns:
                columns.append(key)
    lines += [
        "",
        "SSIM / PSNR dB of each attack's reconstruction of the site's crop, per received level ('-': level not sent):",
        "",
        "| setting | " + " | ".join(f"{attack} {level}" for attack, level in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        found = {(r["attack"], r["level"]): r for r in row["inversion"]}
        lines.append(f"| {row['label']} | " + " | ".join(_cell(found.get(key)) for key in columns) + " |")
    if elapsed_s is not None:
        lines += ["", f"Whole sweep: {elapsed_s / 60:.0f} min ({len(rows)} runs)."]
    return "\n".join(lines) + "\n"
