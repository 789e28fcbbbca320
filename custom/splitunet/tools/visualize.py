"""Figures a person can look at: one case, three orthogonal slices, predicted and true region outlines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: sites and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from splitunet.wire.protocol import REGIONS  # noqa: E402

__all__ = ["REGION_COLORS", "plot_case_overview"]

REGION_COLORS = {"TC": "tab:red", "WT": "yellow", "ET": "cyan"}


def _centre(regions: np.ndarray, shape: Sequence[int]) -> tuple[int, ...]:
    mask = regions.any(axis=0)
    if not mask.any():
        return tuple(s // 2 for s in shape)
    return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))


def plot_case_overview(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    path: str | Path,
    title: str = "",
) -> Path:
    """Save a PNG: axial, coronal and sagittal slices of ``image`` through the true tumour's centre.

    Args:
        image: ``(X, Y, Z)`` volume (e.g. FLAIR) in NIfTI voxel order.
        truth: ``(3, X, Y, Z)`` true TC/WT/ET masks (dashed outlines).
        prediction: ``(3, X, Y, Z)`` predicted TC/WT/ET masks (solid outlines).
        path: output PNG.
        title: figure title.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    centre = _centre(truth, image.shape)
    views = (("axial", 2), ("coronal", 1), ("sagittal", 0))
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for axis, (name, dim) in zip(axes, views):
        index = [slice(None)] * 3
        index[dim] = centre[dim]
        # Transpose + origin="lower" shows the first remaining voxel axis left-right, the second bottom-up.
        axis.imshow(image[tuple(index)].T, cmap="gray", origin="lower")
        for masks, style in ((truth, "dashed"), (prediction, "solid")):
            for channel, region in enumerate(REGIONS):
                section = masks[channel][tuple(index)].T.astype(float)
                if section.any():
                    axis.contour(
                        section,
                        levels=[0.5],
                        colors=REGION_COLORS[region],
                        linestyles=style,
                        linewidths=1.2,
                        origin="lower",
                    )
        axis.set_title(f"{name} slice {centre[dim]}", color="white")
        axis.axis("off")
    handles = [Line2D([], [], color=REGION_COLORS[r], label=r) for r in REGIONS]
    handles += [
        Line2D([], [], color="white", linestyle="solid", label="predicted"),
        Line2D([], [], color="white", linestyle="dashed", label="truth"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=5, facecolor="black", labelcolor="white", frameon=False)
    figure.suptitle(title, color="white")
    figure.tight_layout(rect=(0, 0.07, 1, 0.95))
    figure.savefig(path, dpi=110, facecolor="black")
    plt.close(figure)
    return path
