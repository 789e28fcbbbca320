"""Label-independent crop plans (deterministic, resumable) and crop extraction with padding and flips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from splitunet.data.sampling import RandomCropPlanner, extract_crop, window_plan

SHAPES = {"k-a": (16, 18, 20), "k-b": (20, 18, 16), "k-c": (8, 30, 12)}
CROP = (12, 12, 12)


def _planner(seed=3, **kwargs):
    return RandomCropPlanner(SHAPES, CROP, batch_size=kwargs.pop("batch_size", 2), seed=seed, **kwargs)


def test_plan_format_and_json():
    plan = _planner().next_plan()
    assert set(plan) == {"keys", "origins", "size", "flips"}
    assert len(plan["keys"]) == len(plan["origins"]) == len(plan["flips"]) == 2
    assert plan["size"] == list(CROP)
    assert json.loads(json.dumps(plan)) == plan
    assert all(isinstance(f, bool) for flips in plan["flips"] for f in flips)
    assert all(type(o) is int for origin in plan["origins"] for o in origin)


def test_origins_keep_crop_inside_or_zero():
    planner = _planner(batch_size=5)
    seen = {key: set() for key in SHAPES}
    for _ in range(60):
        plan = planner.next_plan()
        for key, origin in zip(plan["keys"], plan["origins"]):
            for axis, (o, extent, size) in enumerate(zip(origin, SHAPES[key], CROP)):
                if extent >= size:
                    assert 0 <= o <= extent - size
                    seen[key].add((axis, o))
                else:
                    assert o == 0
    # Uniform over positions: both ends of the range are reached (k-a axis 2: 0..8).
    assert (2, 0) in seen["k-a"] and (2, 8) in seen["k-a"]


def test_epochs_visit_every_case():
    planner = _planner(batch_size=2)
    keys = [k for _ in range(3) for k in planner.next_plan()["keys"]]
    assert sorted(keys) == sorted(list(SHAPES) * 2)
    assert planner.epoch == 1 and planner.plans_made == 3


def test_deterministic_and_order_independent():
    reversed_shapes = dict(reversed(list(SHAPES.items())))
    a = _planner(seed=7)
    b = RandomCropPlanner(reversed_shapes, CROP, batch_size=2, seed=7)
    assert [a.next_plan() for _ in range(5)] == [b.next_plan() for _ in range(5)]
    c = _planner(seed=8)
    assert [_planner(seed=7).next_plan() for _ in range(5)] != [c.next_plan() for _ in range(5)]


def test_flip_prob_extremes():
    assert all(not f for fl in _planner(flip_prob=0.0).next_plan()["flips"] for f in fl)
    assert all(f for fl in _planner(flip_prob=1.0).next_plan()["flips"] for f in fl)


def test_state_dict_resumes_identically():
    planner = _planner(seed=11)
    for _ in range(4):
        planner.next_plan()
    state = json.loads(json.dumps(planner.state_dict()))  # what a checkpoint would store
    expected = [planner.next_plan() for _ in range(6)]
    resumed = _planner(seed=999)
    resumed.load_state_dict(state)
    assert [resumed.next_plan() for _ in range(6)] == expected
    assert resumed.plans_made == planner.plans_made


def test_load_state_dict_rejects_other_cases():
    state = _planner().state_dict()
    other = RandomCropPlanner({"k-z": (16, 16, 16)}, CROP, batch_size=2, seed=3)
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"case_shapes": {}}, "at least one case"),
        ({"crop_size": (12, 12)}, "crop_size"),
        ({"crop_size": (12, 0, 12)}, "crop_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"case_shapes": {"k": (16, 16)}}, "shape of case k"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"case_shapes": SHAPES, "crop_size": CROP, "batch_size": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        RandomCropPlanner(**args)


def test_extract_crop_inside():
    volume = np.arange(16 * 18 * 20, dtype=np.float64).reshape(16, 18, 20)
    crop = extract_crop(volume, (1, 2, 3), (4, 5, 6), [False, False, False])
    assert crop.dtype == np.float32 and crop.flags.c_contiguous and crop.shape == (4, 5, 6)
    np.testing.assert_array_equal(crop, volume[1:5, 2:7, 3:9])


def test_extract_crop_pads_at_far_end():
    volume = np.ones((8, 30, 10), dtype=np.float32)
    crop = extract_crop(volume, (0, 5, 0), CROP, None)
    assert crop.shape == CROP
    assert crop[:8, :, :10].min() == 1 and crop[8:].max() == 0 and crop[:, :, 10:].max() == 0


def test_extract_crop_flips_after_padding():
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    crop = extract_crop(volume, (0, 0, 0), (3, 3, 4), [True, False, True])
    padded = np.zeros((3, 3, 4), np.float32)
    padded[:2] = volume
    np.testing.assert_array_equal(crop, padded[::-1, :, ::-1])
    assert crop.flags.c_contiguous


def test_extract_crop_channels_and_label_dtype():
    regions = np.random.default_rng(0).integers(0, 2, size=(3, 16, 18, 20)).astype(np.uint8)
    crop = extract_crop(regions, (4, 6, 8), CROP, [False, True, False])
    assert crop.dtype == np.uint8 and crop.shape == (3, *CROP)
    np.testing.assert_array_equal(crop, regions[:, 4:16, 6:18, 8:20][:, :, ::-1, :])


def test_image_and_label_crops_stay_aligned():
    # A site's volume and the server's regions cropped with the same plan entry line up voxel by voxel.
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(16, 18, 20)).astype(np.float32)
    regions = (volume > 0.5).astype(np.uint8)[None].repeat(3, axis=0)
    plan = RandomCropPlanner({"k": volume.shape}, (20, 12, 12), 1, seed=0, flip_prob=1.0).next_plan()
    args = plan["origins"][0], plan["size"], plan["flips"][0]
    image_crop, region_crop = extract_crop(volume, *args), extract_crop(regions, *args)
    np.testing.assert_array_equal(region_crop[0], (image_crop > 0.5).astype(np.uint8))


def test_extract_crop_errors():
    volume = np.zeros((16, 18, 20), np.float32)
    with pytest.raises(ValueError, match="outside"):
        extract_crop(volume, (16, 0, 0), CROP, None)
    with pytest.raises(ValueError, match="outside"):
        extract_crop(volume, (-1, 0, 0), CROP, None)
    with pytest.raises(ValueError, match="shape"):
        extract_crop(np.zeros((4, 4)), (0, 0), (2, 2), None)
    with pytest.raises(ValueError, match="flips"):
        extract_crop(volume, (0, 0, 0), CROP, [True])


def test_window_plan():
    plan = window_plan(["k-a", "k-a"], [(0, 0, 0), (4, 6, 8)], CROP)
    assert plan == {
        "keys": ["k-a", "k-a"],
        "origins": [[0, 0, 0], [4, 6, 8]],
        "size": [12, 12, 12],
        "flips": [[False, False, False], [False, False, False]],
    }
    with pytest.raises(ValueError, match="2 keys but 1 origins"):
        window_plan(["a", "b"], [(0, 0, 0)], CROP)
