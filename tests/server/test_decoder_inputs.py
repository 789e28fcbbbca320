"""server.decoder_inputs: which site feeds each decoder input, in training and at inference."""

from __future__ import annotations

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.server.decoder_inputs import check_sent_levels, decoder_inputs, modality_groups, training_order


def test_training_order_follows_the_modalities_whatever_the_site_names():
    assert training_order({"z": "t2", "y": "flair", "x": "t1gd", "w": "t1"}) == ["y", "w", "x", "z"]
    with pytest.raises(SplitUNetConfigError, match="sites a and b both hold modality t1"):
        training_order({"a": "t1", "b": "t1"})


def test_modality_groups_put_the_sites_sharing_a_modality_on_one_decoder_input():
    groups = modality_groups({"z": "t2", "b-1": "flair", "x": "t1gd", "a-1": "flair", "w": "t1"})
    assert groups == {"flair": ["a-1", "b-1"], "t1": ["w"], "t1gd": ["x"], "t2": ["z"]}
    one_each = {"z": "t2", "y": "flair", "x": "t1gd", "w": "t1"}
    assert [site for sites in modality_groups(one_each).values() for site in sites] == training_order(one_each)
    with pytest.raises(SplitUNetConfigError, match=r"modalities \['pd'\] are not among"):
        modality_groups({"a": "pd"})


def test_a_site_blocking_an_expected_skip_level_is_refused_with_the_levels_to_configure():
    check_sent_levels("site-1", "flair", None, (0, 1, 2, 3))
    check_sent_levels("site-1", "flair", [0], (1, 2, 3))
    with pytest.raises(
        SplitUNetConfigError,
        match=r"site site-1 \(flair\) never sends skip level\(s\) \['x0'\].*"
        r"configure the job with skip_levels \[1, 2, 3\]",
    ):
        check_sent_levels("site-1", "flair", [0], (0, 1, 2, 3))


TRAINED = ["flair", "t1", "t1gd", "t2"]


def test_decoder_inputs_follow_the_trained_order_whatever_the_site_names():
    present = {"b": "t2", "a": "t1gd", "c": "flair", "d": "t1"}
    assert decoder_inputs(TRAINED, present, "concat") == ["c", "d", "a", "b"]
    assert decoder_inputs(TRAINED, {"a": "t1gd", "c": "flair"}, "mean") == ["c", None, "a", None]


@pytest.mark.parametrize(
    "present, fusion, message",
    [
        ({"a": "flair", "b": "t1", "c": "t1gd"}, "concat", r"\['t2'\] are absent.*concatenation"),
        ({"a": "flair", "b": "flair"}, "mean", "both hold modality flair"),
        ({"a": "pd"}, "mean", "site a holds pd, but the model was trained on"),
        ({}, "mean", "no site takes part"),
    ],
)
def test_decoder_inputs_refuse_what_the_model_cannot_take(present, fusion, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        decoder_inputs(TRAINED, present, fusion)
