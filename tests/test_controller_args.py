"""SplitLearningController: a malformed job configuration fails when FLARE builds the workflow, naming the argument."""

from __future__ import annotations

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.flare.controller import SplitLearningController


def test_defaults_build():
    controller = SplitLearningController()
    assert controller.on_site_failure == "stop" and controller.resume is False and controller.checkpoint_every == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_iterations": 0}, "num_iterations must be an int >= 1"),
        ({"batch_size": "2"}, "batch_size must be an int >= 1"),
        ({"task_timeout": -1}, "task_timeout"),
        ({"setup_timeout": 0}, "setup_timeout"),
        ({"crop_size": [16, 48, 48]}, "crop_size must be three ints >= 32"),
        ({"crop_size": [48, 48]}, "crop_size"),
        ({"loss": "mse"}, "loss must be one of"),
        ({"sw_overlap": 1.0}, "sw_overlap"),
        ({"fusion": "sum"}, "fusion must be 'concat' or 'mean'"),
        ({"skip_levels": [0, 4]}, "skip_levels"),
        ({"transfer_dtype": "int8"}, "transfer_dtype"),
        ({"on_site_failure": "retry"}, "on_site_failure must be one of"),
        ({"on_site_failure": "continue"}, "need fusion='mean'"),
        ({"modality_dropout": 0.25}, "need fusion='mean'"),
        ({"modality_dropout": 1.0, "fusion": "mean"}, "modality_dropout must be in"),
        ({"checkpoint_every": -2}, "checkpoint_every"),
        ({"experiment": "../elsewhere"}, "experiment must be"),
        ({"experiment": ""}, "experiment must be"),
        ({"task_long_poll_s": -0.1}, "task_long_poll_s must be a number of seconds"),
        ({"task_long_poll_s": 60}, "task_long_poll_s must be a number of seconds"),
        ({"amp": "yes"}, "amp must be true or false"),
    ],
)
def test_malformed_arguments_are_named(kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        SplitLearningController(**kwargs)


def test_mean_fusion_allows_dropout_and_continuing():
    controller = SplitLearningController(fusion="mean", on_site_failure="continue", modality_dropout=0.3)
    assert controller.modality_dropout == 0.3
