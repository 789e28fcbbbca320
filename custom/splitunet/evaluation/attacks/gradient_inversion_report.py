"""Tables and figure of ``splitunet gradient-inversion``: intervals over crops and channels, markdown, PNG grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from splitunet.evaluation.intervals import t_interval
from splitunet.wire.protocol import MODALITIES

__all__ = ["summarize", "report_markdown", "plot_modalities"]


def _interval_over(runs: list[dict], key: str, prior_key: str | None = None, per_crop: bool = False) -> dict:
    values = []
    for run in runs:
        channel_values = [c[key] - (c[prior_key] if prior_key else 0.0) for c in run["channels"].values()]
        values.extend([float(np.mean(channel_values))] if per_crop else channel_values)
    return t_interval(values)


def summarize(runs: list[dict]) -> dict:
    """Per model and setting: t intervals of SSIM, gains, PSNR, gradient distances and label Dice."""
    summary = {}
    for name in dict.fromkeys(f"{run['model']}, {run['setting']}" for run in runs):
        chosen = [run for run in runs if f"{run['model']}, {run['setting']}" == name]
        entry = {
            "model": chosen[0]["model"],
            "setting": chosen[0]["setting"],
            "epsilon": chosen[0]["epsilon"],
            "noise_multiplier": chosen[0]["noise_multiplier"],
            "ssim": _interval_over(chosen, "ssim"),
            "ssim_prior": _interval_over(chosen, "ssim_prior"),
            "ssim_reported": _interval_over(chosen, "ssim_reported"),
            "ssim_gain": _interval_over(chosen, "ssim", "ssim_prior"),
            "ssim_gain_per_crop": _interval_over(chosen, "ssim", "ssim_prior", per_crop=True),
            "ssim_brain": _interval_over(chosen, "ssim_brain"),
            "ssim_prior_brain": _interval_over(chosen, "ssim_prior_brain"),
            "ssim_brain_gain": _interval_over(chosen, "ssim_brain", "ssim_prior_brain"),
            "psnr": _interval_over(chosen, "psnr"),
            "psnr_prior": _interval_over(chosen, "psnr_prior"),
            "gradient_distance": t_interval([run["attack"]["gradient_distance"] for run in chosen]),
            "gradient_distance_prior": t_interval([run["attack"]["gradient_distance_prior"] for run in chosen]),
        }
        if chosen[0]["labels"] is not None:
            entry["dice_wt"] = t_interval([v for run in chosen for v in run["labels"]["dice_wt"]])
            entry["dice_wt_prior_frequency"] = t_interval(
                [v for run in chosen for v in run["labels"]["dice_wt_prior_frequency"]]
            )
        summary[name] = entry
    return summary


def _cell(interval: dict, digits: int = 3) -> str:
    if not math.isfinite(interval["mean"]):
        return "-"
    if not math.isfinite(interval["low"]):
        return f"{interval['mean']:.{digits}f}"
    return f"{interval['mean']:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def report_markdown(report: dict) -> str:
    """``report.md`` of a study's report."""
    study = report["study"]
    lines = [
        "# Gradient inversion of a FedAvg hospital's update",
        "",
        f"`{report['command']}`, {report['date']}; {report['seconds']:.0f} s wall, "
        f"{report.get('cpu_seconds', float('nan')):.0f} s CPU, {study['threads']} torch thread(s).",
        f"Crop {tuple(study['crop_size'])}, batch {study['batch_size']}, U-Net features {tuple(study['features'])}, "
        f"seeds {tuple(study['seeds'])}; attack: labels {study['labels']}, weighting {study['weighting']}, "
        f"{study['iterations']} iterations x {study['restarts']} restarts, lr {study['lr']}"
        f"{'' if study.get('decay', True) else ' (constant)'}, TV {study['tv_weight']}. "
        f"DP: one DP-SGD step (Opacus), sample rate 1, delta {study['delta']:g}, C = median per-sample gradient norm "
        "of the auxiliary crops.",
        "",
        "SSIM per modality channel (3D, MONAI), mean and 95 % t interval over crops x channels; the gain is over the "
        "mean-image prior; 'reported' is max(attack, prior); 'per crop': the interval over crops of the channel mean.",
        "",
        "| model, setting | sigma | SSIM attack | SSIM prior | reported | gain | gain per crop | brain SSIM attack | "
        "brain SSIM prior | brain gain | PSNR attack / prior dB | WT Dice attack / prior frequency | "
        "gradient distance start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["summary"].items():
        sigma = "-" if entry["noise_multiplier"] is None else f"{entry['noise_multiplier']:.3g}"
        dice = "-"
        if "dice_wt" in entry:
            dice = f"{_cell(entry['dice_wt'], 2)} / {_cell(entry['dice_wt_prior_frequency'], 2)}"
        lines.append(
            f"| {name} | {sigma} | {_cell(entry['ssim'])} | {_cell(entry['ssim_prior'])} | "
            f"{_cell(entry['ssim_reported'])} | {_cell(entry['ssim_gain'])} | {_cell(entry['ssim_gain_per_crop'])} | "
            f"{_cell(entry['ssim_brain'])} | {_cell(entry['ssim_prior_brain'])} | {_cell(entry['ssim_brain_gain'])} | "
            f"{entry['psnr']['mean']:.1f} / {entry['psnr_prior']['mean']:.1f} | {dice} | "
            f"{entry['gradient_distance_prior']['mean']:.3f} -> {entry['gradient_distance']['mean']:.3f} |"
        )
    lines += ["", f"Figure: `{report['figure']}` (seed {study['seeds'][0]}, axial mid-slice per modality).", ""]
    return "\n".join(lines)


def plot_modalities(images: dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """One row per volume (truth first), one column per modality: the axial mid-slice of the first sample, each
    reconstruction intensity-aligned to the truth as the metrics score it."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    from splitunet.evaluation.metrics import align_intensity

    truth = images["truth"][:1]
    rows = list(images.items())
    figure, axes = plt.subplots(
        len(rows), len(MODALITIES), figsize=(2.0 * len(MODALITIES), 2.0 * len(rows) + 0.6), squeeze=False
    )
    middle = truth.shape[2] // 2
    for channel, modality in enumerate(MODALITIES):
        target = truth[:, channel : channel + 1]
        low, high = float(target.min()), float(target.max())
        for row, (name, volume) in enumerate(rows):
            shown = volume[:1, channel : channel + 1].expand_as(target)
            shown = target if name == "truth" else align_intensity(shown, target)
            axis = axes[row, channel]
            axis.imshow(shown[0, 0, middle].numpy().T, cmap="gray", origin="lower", vmin=low, vmax=high)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(modality, fontsize=9)
            if channel == 0:
                axis.set_ylabel(name, fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
