"""server.cases: matching the parties' cases, reporting the missing ones, refusing misaligned grids, the split."""

from __future__ import annotations

import numpy as np
import pytest

from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.server.cases import (
    check_inference_cases,
    check_training_cases,
    inference_notes,
    match_cases,
    split_cases,
    training_notes,
)

MODALITY = {"site-1": "flair", "site-2": "t1"}


def _cases(keys, digest="grid", shape=(40, 40, 40)) -> dict:
    return {key: {"shape": list(shape), "affine_digest": digest} for key in keys}


def _name(key: str) -> str:
    return f"BRATS_{key}"


def test_cases_every_party_holds_are_matched_and_the_others_reported_by_party():
    labels = _cases(["k1", "k2", "k3"])
    sites = {"site-1": _cases(["k1", "k2", "k3", "k4"]), "site-2": _cases(["k1", "k2"])}
    matched = match_cases({"server": labels, **sites})
    assert matched.common == ["k1", "k2"]
    assert matched.left_out == {"server": 1, "site-2": 2}
    # By key in the log (FLARE archives it); with the case ID for the label holder's private details only.
    assert training_notes(matched, "server", MODALITY) == [
        "case key k4 has no label; left out of training",
        "case key k3 is missing at site-2 (t1); left out of training",
        "case key k4 is missing at site-2 (t1); left out of training",
    ]
    assert (
        training_notes(matched, "server", MODALITY, _name)[0]
        == "case key k4 (case BRATS_k4) has no label; left out of training"
    )
    assert inference_notes(match_cases(sites), MODALITY) == [
        "case key k3 is missing at site-2 (t1); skipped",
        "case key k4 is missing at site-2 (t1); skipped",
    ]


def test_training_needs_two_common_cases_and_returns_the_label_shapes():
    labels = _cases(["k1", "k2"], shape=(33, 34, 35))
    sites = {"site-1": _cases(["k1", "k2"]), "site-2": _cases(["k1", "k2"])}
    matched = match_cases({"server": labels, **sites})
    shapes = check_training_cases(matched, labels, sites, MODALITY, _name, lambda case: f"/labels/{case}.nii.gz")
    assert shapes == {"k1": (33, 34, 35), "k2": (33, 34, 35)}
    lonely = match_cases({"server": labels, "site-1": _cases(["k1"])})
    with pytest.raises(SplitUNetConfigError, match="only 1 cases are present at every party; need at least 2"):
        check_training_cases(lonely, labels, {"site-1": _cases(["k1"])}, MODALITY, _name, str)


def test_a_misaligned_site_volume_is_named_with_party_case_and_label_file():
    labels = _cases(["k1", "k2"], shape=(40, 40, 40))
    sites = {"site-1": _cases(["k1", "k2"]), "site-2": {**_cases(["k1"]), **_cases(["k2"], "other", (40, 40, 39))}}
    matched = match_cases({"server": labels, **sites})
    with pytest.raises(SplitUNetDataError) as caught:
        check_training_cases(matched, labels, sites, MODALITY, _name, lambda case: f"/labels/{case}.nii.gz")
    error = caught.value
    # The full details, for the label holder's private file; the run folder gets the key (PrivateDetails).
    assert (error.party, error.case, error.case_key, error.file) == (
        "site-2",
        "BRATS_k2",
        "k2",
        "/labels/BRATS_k2.nii.gz",
    )
    assert "t1 volume (shape [40, 40, 39]) is not voxel-aligned with the label (shape [40, 40, 40])" in str(error)


def test_inference_matches_the_sites_against_the_first_one():
    sites = {"site-1": _cases(["k1", "k2"], shape=(30, 31, 32)), "site-2": _cases(["k2", "k3"], shape=(30, 31, 32))}
    assert check_inference_cases(match_cases(sites), sites, MODALITY) == {"k2": (30, 31, 32)}
    apart = {"site-1": _cases(["k1"]), "site-2": _cases(["k2"])}
    with pytest.raises(SplitUNetDataError, match="no case is present at every site taking part") as caught:
        check_inference_cases(match_cases(apart), apart, MODALITY)
    assert caught.value.party == "site-1"
    skewed = {"site-1": _cases(["k1"]), "site-2": _cases(["k1"], "other")}
    with pytest.raises(
        SplitUNetDataError, match="the t1 volume at site-2 .* not voxel-aligned with the flair volume"
    ) as caught:
        check_inference_cases(match_cases(skewed), skewed, MODALITY)
    assert caught.value.case_key == "k1" and "case key=k1" in str(caught.value)


def test_the_split_is_fixed_by_the_seed_and_leaves_a_case_to_train_on():
    keys = [f"k{i:02d}" for i in range(12)]
    train, val = split_cases(keys, 4, seed=3)
    assert (train, val) == split_cases(keys, 4, seed=3)
    assert len(val) == 4 and sorted(train + val) == keys and train == sorted(train) and val == sorted(val)
    assert split_cases(keys, 4, seed=4) != (train, val)
    # The permutation the workflows have always drawn: default_rng(seed).permutation over the sorted keys.
    order = [keys[i] for i in np.random.default_rng(3).permutation(len(keys))]
    assert val == sorted(order[:4])
    assert split_cases(["a", "b"], 4, seed=0)[0] and len(split_cases(["a", "b"], 4, seed=0)[1]) == 1
