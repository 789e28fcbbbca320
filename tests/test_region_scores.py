import math
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from splitunet.region_scores import RegionScores, volume_diagonal


def _cube(shape, start, size):
    mask = torch.zeros(shape)
    mask[tuple(slice(s, s + size) for s in start)] = 1
    return mask


def _independent_hd95(prediction: np.ndarray, truth: np.ndarray) -> float:
    """HD95 from surface distances computed with scipy, independently of MONAI."""

    def surface(mask):
        from scipy.ndimage import binary_erosion

        return mask & ~binary_erosion(mask)

    a, b = surface(prediction.astype(bool)), surface(truth.astype(bool))
    to_b = distance_transform_edt(~b)[a]
    to_a = distance_transform_edt(~a)[b]
    return max(np.percentile(to_b, 95), np.percentile(to_a, 95))


def test_hd95_matches_an_independent_computation_and_dice_is_monai():
    shape = (3, 24, 24, 24)
    truth = torch.stack(
        [_cube(shape[1:], (4, 4, 4), 8), _cube(shape[1:], (3, 3, 3), 12), _cube(shape[1:], (6, 6, 6), 3)]
    )
    prediction = torch.stack(
        [_cube(shape[1:], (7, 4, 4), 8), _cube(shape[1:], (3, 3, 5), 12), _cube(shape[1:], (6, 6, 6), 3)]
    )
    scores = RegionScores()
    scores.add(prediction, truth)
    dice, hd95 = scores.aggregate()
    for region, index in (("TC", 0), ("WT", 1)):
        expected = _independent_hd95(prediction[index].numpy(), truth[index].numpy())
        assert hd95[region] == pytest.approx(expected, abs=1.0)
        assert hd95[region] > 1.0
    assert hd95["ET"] == 0.0 and dice["ET"] == pytest.approx(1.0)
    assert dice["TC"] == pytest.approx(2 * 5 * 64 / (2 * 512))


def test_empty_masks_follow_the_brats_convention():
    shape = (3, 10, 20, 20)
    truth = torch.zeros(shape)
    prediction = torch.zeros(shape)
    truth[0, 2:5, 2:5, 2:5] = 1  # TC missed entirely
    prediction[1, 2:5, 2:5, 2:5] = 1  # WT predicted where there is none
    scores = RegionScores()
    scores.add(prediction, truth)
    dice, hd95 = scores.aggregate()
    assert hd95["TC"] == hd95["WT"] == pytest.approx(volume_diagonal((10, 20, 20))) == pytest.approx(30.0)
    assert hd95["ET"] == 0.0  # both empty
    assert dice["TC"] == 0.0 and math.isnan(dice["ET"])


def test_means_over_cases_and_shape_errors():
    truth = torch.zeros(3, 8, 8, 8)
    truth[:, 2:6, 2:6, 2:6] = 1
    scores = RegionScores()
    scores.add(truth, truth)
    scores.add(torch.zeros_like(truth), truth)
    dice, hd95 = scores.aggregate()
    assert len(scores) == 2
    assert dice["mean"] == pytest.approx(0.5)
    assert hd95["WT"] == pytest.approx(volume_diagonal((8, 8, 8)) / 2)
    with pytest.raises(ValueError, match=r"\(3, D, H, W\)"):
        scores.add(truth[:2], truth[:2])
    assert all(math.isnan(v) for v in RegionScores().aggregate()[1].values())


def test_read_only_arrays_are_scored_without_a_warning_and_left_untouched():
    """Masks read from NIfTI files can be read-only NumPy arrays; scoring copies them instead of viewing them."""
    truth = np.zeros((3, 8, 8, 8), dtype=np.float32)
    truth[:, 2:6, 2:6, 2:6] = 1
    truth.flags.writeable = False
    prediction = truth.copy()
    prediction.flags.writeable = False
    scores = RegionScores()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores.add(prediction, truth)
    dice, _ = scores.aggregate()
    assert dice["mean"] == pytest.approx(1.0)
    assert not truth.flags.writeable and truth.sum() == 3 * 64
