"""Label layouts: region mapping per dataset, the inverse for predictions, and errors for bad label values."""

from __future__ import annotations

import numpy as np
import pytest

from splitunet.data.labels import (
    LAYOUTS,
    LabelLayout,
    get_layout,
    labels_to_regions,
    regions_to_labels,
    validate_labels,
)
from splitunet.errors import SplitUNetDataError
from splitunet.wire.protocol import REGIONS

SHAPE = (16, 18, 20)

# layout, {label value: (in TC, in WT, in ET)} straight from docs/design.md, "Labels and layouts".
EXPECTED = [
    ("msd", {0: (0, 0, 0), 1: (0, 1, 0), 2: (1, 1, 0), 3: (1, 1, 1)}),
    ("brats2021", {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 4: (1, 1, 1)}),
    ("brats2023", {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 3: (1, 1, 1)}),
]


def _random_labels(layout: str, seed: int = 0) -> np.ndarray:
    values = np.array(sorted(LAYOUTS[layout].label_names))
    return np.random.default_rng(seed).choice(values, size=SHAPE).astype(np.uint8)


def test_region_order_is_protocol_order():
    assert REGIONS == ("TC", "WT", "ET")


@pytest.mark.parametrize("layout, expected", EXPECTED)
def test_labels_to_regions_per_value(layout, expected):
    values = np.array(sorted(expected), dtype=np.uint8)
    regions = labels_to_regions(values, layout)
    assert regions.shape == (3, len(values))
    assert regions.dtype == np.uint8
    for i, value in enumerate(values):
        assert tuple(regions[:, i]) == expected[int(value)], f"{layout} label {value}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip(layout):
    labels = _random_labels(layout)
    regions = labels_to_regions(labels, layout)
    assert regions.shape == (3, *SHAPE)
    np.testing.assert_array_equal(regions_to_labels(regions, layout), labels)
    # Probabilities near the threshold give the same answer as hard masks.
    probs = np.where(regions > 0, 0.9, 0.1).astype(np.float32)
    np.testing.assert_array_equal(regions_to_labels(probs, layout), labels)


def test_msd_enhancing_is_label_3_not_2():
    # The MONAI BraTS tutorial's ConvertToMultiChannel maps ET = label 2; for MSD Task01 ET is 3.
    layout = LAYOUTS["msd"]
    assert layout.regions["ET"] == (3,)
    assert layout.enhancing_label == 3 and layout.core_label == 2 and layout.oedema_label == 1
    et = labels_to_regions(np.array([1, 2, 3], dtype=np.uint8), "msd")[REGIONS.index("ET")]
    np.testing.assert_array_equal(et, [0, 0, 1])


def test_regions_to_labels_imposes_nesting():
    # channel order TC, WT, ET; ET alone -> enhancing, TC without WT -> core, WT alone -> oedema.
    regions = np.array([[0, 0, 1, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(regions_to_labels(regions, "brats2021"), [0, 2, 1, 4, 4])
    np.testing.assert_array_equal(regions_to_labels(regions, "msd"), [0, 1, 2, 3, 3])


def test_regions_to_labels_threshold_and_shape_check():
    regions = np.zeros((3, 2), dtype=np.float32)
    regions[1] = [0.49, 0.5]
    np.testing.assert_array_equal(regions_to_labels(regions, "msd"), [0, 1])
    with pytest.raises(ValueError, match="shape"):
        regions_to_labels(np.zeros((2, 4, 4)), "msd")


def test_float_labels_accepted():
    labels = _random_labels("brats2021").astype(np.float32)
    assert labels_to_regions(labels, "brats2021").shape == (3, *SHAPE)
    assert validate_labels(labels, "brats2021").dtype == np.uint8


@pytest.mark.parametrize("layout, bad_value", [("msd", 4), ("brats2021", 3), ("brats2023", 4), ("msd", -1)])
def test_values_outside_layout(layout, bad_value):
    expected_text = f"label values {bad_value} are not in layout"
    labels = _random_labels("msd" if layout != "brats2021" else "brats2021").astype(np.int16)
    labels[3, 4, 5] = bad_value
    with pytest.raises(SplitUNetDataError) as info:
        labels_to_regions(labels, layout, party="server", case="BRATS_007", file="/data/labels/BRATS_007.nii.gz")
    message = str(info.value)
    for text in ("party=server", "case=BRATS_007", "/data/labels/BRATS_007.nii.gz", expected_text, layout):
        assert text in message
    assert info.value.case == "BRATS_007" and info.value.party == "server"


def test_nan_and_fractional_labels():
    labels = _random_labels("msd").astype(np.float32)
    labels[0, 0, :3] = np.nan
    with pytest.raises(SplitUNetDataError, match="3 non-finite") as info:
        labels_to_regions(labels, "msd", party="server", case="c1", file="f.nii.gz")
    assert "case=c1" in str(info.value) and "f.nii.gz" in str(info.value)
    labels = _random_labels("msd").astype(np.float32)
    labels[1, 1, 1] = 1.5
    with pytest.raises(SplitUNetDataError, match="non-integer.*1.5"):
        labels_to_regions(labels, "msd", party="server", case="c1", file="f.nii.gz")


def test_get_layout():
    assert get_layout("MSD") is LAYOUTS["msd"]
    assert get_layout(LAYOUTS["brats2023"]) is LAYOUTS["brats2023"]
    with pytest.raises(ValueError, match="brats2021, brats2023, msd"):
        get_layout("brats2018")


def test_layout_definitions_are_checked():
    with pytest.raises(ValueError, match="nest"):
        LabelLayout("bad", {0: "bg", 1: "a", 2: "b"}, {"TC": (1,), "WT": (1, 2), "ET": (2,)})
    with pytest.raises(ValueError, match="exactly one label"):
        LabelLayout("bad", {0: "bg", 1: "a", 2: "b", 3: "c"}, {"TC": (3,), "WT": (1, 2, 3), "ET": (3,)})
