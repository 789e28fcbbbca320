"""Dice and HD95 per tumour region over whole held-out volumes, the scores every topology's validation reports.

Dice is MONAI's ``DiceMetric``; the 95th-percentile Hausdorff distance is MONAI's ``HausdorffDistanceMetric`` with
``percentile=95``, in voxels (1 mm on BraTS grids). MONAI leaves HD95 undefined (NaN) when the prediction or the
truth of a region is empty, which happens often early in training (small ET) and would silently drop exactly the
worst cases from a mean. The BraTS challenge convention is used instead: both empty scores 0, one of them empty
scores the volume's diagonal (373.13 voxels on the 240x240x155 BraTS grid), so a model that misses a region
everywhere cannot look better than one that finds it roughly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from splitunet.wire.protocol import REGIONS

__all__ = ["RegionScores", "volume_diagonal"]


def volume_diagonal(shape: Sequence[int]) -> float:
    """Length in voxels of the diagonal of a volume of ``shape``: the HD95 of a region missed entirely."""
    return float(math.sqrt(sum(int(size) ** 2 for size in shape)))


class RegionScores:
    """Accumulates Dice and HD95 per region, one whole case at a time.

    Example:
        >>> scores = RegionScores()
        >>> scores.add(prediction, truth)          # (3, D, H, W) binary masks of one case
        >>> dice, hd95 = scores.aggregate()        # {"TC", "WT", "ET", "mean"} each

    Dice is the mean over cases whose region is present in the truth (MONAI's ``ignore_empty``); HD95 is the mean
    over all cases with the BraTS convention for empty masks (see the module docstring).
    """

    def __init__(self):
        self._dice = DiceMetric(include_background=True, reduction="mean_batch", get_not_nans=True)
        self._hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        self._hd95_rows: list[list[float]] = []

    def __len__(self) -> int:
        return len(self._hd95_rows)

    def add(self, prediction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> None:
        """Score one case.

        Args:
            prediction: binary masks ``(3, D, H, W)`` (TC, WT, ET), e.g. thresholded sigmoid probabilities.
            truth: the case's region masks, same shape.
        """
        prediction = _float_tensor(prediction)
        truth = _float_tensor(truth)
        if prediction.shape != truth.shape or prediction.ndim != 4 or prediction.shape[0] != len(REGIONS):
            raise ValueError(
                f"prediction and truth must both be (3, D, H, W) region masks; got {tuple(prediction.shape)} and "
                f"{tuple(truth.shape)}"
            )
        self._dice(prediction[None], truth[None])
        self._hd95_rows.append(self._case_hd95(prediction, truth))

    def _case_hd95(self, prediction: torch.Tensor, truth: torch.Tensor) -> list[float]:
        worst = volume_diagonal(prediction.shape[1:])
        with warnings.catch_warnings():
            # MONAI warns for every empty mask; those cases are handled below by convention.
            warnings.simplefilter("ignore")
            measured = self._hd95(prediction[None], truth[None])[0].tolist()
        row = []
        for region, value in enumerate(measured):
            has_prediction = bool(prediction[region].any())
            has_truth = bool(truth[region].any())
            if not has_prediction and not has_truth:
                row.append(0.0)
            elif has_prediction != has_truth:
                row.append(worst)
            else:
                row.append(float(value))
        return row

    def aggregate(self) -> tuple[dict[str, float], dict[str, float]]:
        """``(dice, hd95)``: per region and their ``"mean"``; NaN where no case was added (or, for Dice, where no
        case has the region)."""
        if not self._hd95_rows:
            nan = {region: math.nan for region in (*REGIONS, "mean")}
            return dict(nan), dict(nan)
        values, counted = self._dice.aggregate()
        # MONAI reports 0 for a region no case has; that is "not measured", not "missed".
        per_region = [float(v) if n > 0 else math.nan for v, n in zip(values.tolist(), counted.tolist())]
        dice = {region: float(value) for region, value in zip(REGIONS, per_region)}
        dice["mean"] = float(np.nanmean(per_region)) if not all(math.isnan(v) for v in per_region) else math.nan
        hd95_per_region = np.asarray(self._hd95_rows, dtype=float).mean(axis=0)
        hd95 = {region: float(value) for region, value in zip(REGIONS, hd95_per_region)}
        hd95["mean"] = float(hd95_per_region.mean())
        return dice, hd95


def _float_tensor(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``values`` as a float32 tensor. A read-only NumPy array (masks read from NIfTI files can be) is copied once:
    torch warns on, and must not write through, a view of one; others convert as before, copying only to change type."""
    if isinstance(values, np.ndarray):
        array = np.asarray(values, dtype=np.float32)
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    return torch.as_tensor(values).float()
