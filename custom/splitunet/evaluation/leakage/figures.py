"""Figures of leakage: reconstructions next to the originals, and the Dice-versus-leakage trade-off."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: sites and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from splitunet.evaluation.metrics import align_intensity  # noqa: E402

__all__ = ["plot_reconstruction_grid", "plot_tradeoff"]

_VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))
_PANELS = ("original", "reconstruction", "|difference|")


def _section(volume: np.ndarray, dim: int) -> np.ndarray:
    index = [slice(None)] * 3
    index[dim] = volume.shape[dim] // 2
    # Transposed and shown with origin="lower", as the demo's overview figure does.
    return volume[tuple(index)].T


def plot_reconstruction_grid(
    original: torch.Tensor, reconstructions: Mapping[str, torch.Tensor], path: str | Path, title: str = ""
) -> Path:
    """Save a PNG with one row per reconstruction: for the axial, coronal and sagittal mid-slices of the crop,
    the original, the reconstruction (intensity-aligned as the metrics score it) and their absolute difference.

    Args:
        original: the true crop ``(1, D, H, W)`` or ``(D, H, W)``.
        reconstructions: row label (e.g. ``"x0"``) -> reconstruction of the same crop, same shape.
        path: output PNG.
        title: figure title.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = original.reshape(1, 1, *original.shape[-3:]).float()
    rows = list(reconstructions.items())
    low, high = float(truth.min()), float(truth.max())
    figure, axes = plt.subplots(len(rows), 9, figsize=(13.5, 1.6 * len(rows) + 0.8), squeeze=False, facecolor="white")
    for row, (label, reconstruction) in enumerate(rows):
        aligned = align_intensity(reconstruction.reshape(truth.shape).float(), truth)
        volumes = (truth[0, 0].numpy(), aligned[0, 0].numpy(), (aligned - truth).abs()[0, 0].numpy())
        for view, (view_name, dim) in enumerate(_VIEWS):
            for panel, (panel_name, volume) in enumerate(zip(_PANELS, volumes)):
                axis = axes[row, 3 * view + panel]
                limits = (0.0, high - low) if panel == 2 else (low, high)
                axis.imshow(_section(volume, dim), cmap="gray", origin="lower", vmin=limits[0], vmax=limits[1])
                axis.set_xticks([])
                axis.set_yticks([])
                if row == 0:
                    axis.set_title(f"{view_name}\n{panel_name}", fontsize=8)
            axes[row, 0].set_ylabel(label, fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _error_bar(value: float, interval: Mapping | None) -> list[list[float]] | None:
    """Matplotlib's ``[[below], [above]]`` for an interval around ``value``; ``None`` without finite bounds."""
    if not interval:
        return None
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return None
    return [[max(value - low, 0.0)], [max(high - value, 0.0)]]


def plot_tradeoff(points: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Save a scatter of task Dice (mean of TC/WT/ET) against the best attack's SSIM, one labelled point per run.

    Args:
        points: ``{"label", "dice", "ssim", "ssim_prior"}`` per run, optionally ``"dice_interval"`` and
            ``"ssim_interval"`` (``{"low", "high"}``, drawn as error bars where finite); the prior's SSIM is drawn
            as a line (an attack at that line learned nothing beyond the mean image).
        path: output PNG.
        title: figure title.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 5))
    for point in points:
        axis.errorbar(
            point["ssim"],
            point["dice"],
            xerr=_error_bar(point["ssim"], point.get("ssim_interval")),
            yerr=_error_bar(point["dice"], point.get("dice_interval")),
            fmt="o",
            markersize=5,
            capsize=3,
            elinewidth=1,
        )
        axis.annotate(
            point["label"], (point["ssim"], point["dice"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    priors = [p["ssim_prior"] for p in points if p.get("ssim_prior") is not None]
    if priors:
        axis.axvline(float(np.mean(priors)), color="grey", linestyle="--", linewidth=1, label="mean-image prior")
        axis.legend(loc="lower right", fontsize=8)
    axis.set_xlabel("best attack's SSIM of the reconstructed site crop (lower = less leakage)")
    axis.set_ylabel("task Dice, mean of TC/WT/ET (higher = better)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
