"""server.run_settings: every workflow argument is checked once, and a malformed one is named."""

from __future__ import annotations

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.server.run_settings import InferenceSettings, TaskSettings, TrainingSettings
from splitunet.wire.model_config import MIN_CROP_SIZE, SplitModelConfig


def test_training_defaults_take_the_model_defaults_from_the_model_config():
    settings = TrainingSettings()
    assert settings.model == SplitModelConfig()
    assert settings.model.features == (8, 16, 32, 64, 128, 8) and settings.model.learning_rate == 2e-3
    assert settings.on_site_failure == "stop" and settings.resume is False and settings.checkpoint_every == 0
    assert settings.pipeline_delay == 0  # lock-step


def test_arguments_are_normalised():
    settings = TrainingSettings(crop_size=[32, 40, 48], sw_overlap=0, features=[4, 8, 8, 16, 16], sites=["b", "a"])
    assert settings.crop_size == (32, 40, 48) and isinstance(settings.sw_overlap, float)
    assert settings.model.features == (4, 8, 8, 16, 16, 4) and settings.sites == ["b", "a"]
    assert TrainingSettings(sites=[]).sites is None
    assert InferenceSettings(roi_size=[32, 32, 40]).roi_size == (32, 32, 40)
    assert TaskSettings(task_long_poll_s=2).task_long_poll_s == 2.0


def test_crop_and_window_sizes_use_the_wire_minimum():
    assert TrainingSettings(crop_size=[MIN_CROP_SIZE] * 3).crop_size == (MIN_CROP_SIZE,) * 3
    with pytest.raises(SplitUNetConfigError, match=f"crop_size must be three ints >= {MIN_CROP_SIZE}"):
        TrainingSettings(crop_size=[MIN_CROP_SIZE - 1, 48, 48])
    with pytest.raises(SplitUNetConfigError, match=f"roi_size must be three ints >= {MIN_CROP_SIZE}"):
        InferenceSettings(roi_size=[MIN_CROP_SIZE - 1] * 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task_timeout": -1}, "task_timeout must be an int >= 1"),
        ({"setup_timeout": 0}, "setup_timeout must be an int >= 1"),
        ({"on_site_failure": "retry"}, "on_site_failure must be one of"),
        ({"task_long_poll_s": -0.1}, "task_long_poll_s must be a number of seconds"),
        ({"task_long_poll_s": 60}, "task_long_poll_s must be a number of seconds"),
        ({"task_check_period": 0}, "task_check_period must be a number of seconds > 0"),
        ({"num_threads": -1}, "num_threads must be an int >= 0"),
    ],
)
def test_malformed_task_arguments_are_named(kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        TaskSettings(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_iterations": 0}, "num_iterations must be an int >= 1"),
        ({"batch_size": "2"}, "batch_size must be an int >= 1"),
        ({"val_every": True}, "val_every must be an int >= 1"),
        ({"num_val_cases": 0}, "num_val_cases must be an int >= 1"),
        ({"sw_batch_size": 0}, "sw_batch_size must be an int >= 1"),
        ({"log_every": 0}, "log_every must be an int >= 1"),
        ({"task_timeout": -1}, "task_timeout"),
        ({"setup_timeout": 0}, "setup_timeout"),
        ({"crop_size": [16, 48, 48]}, "crop_size must be three ints >= 32"),
        ({"crop_size": [48, 48]}, "crop_size"),
        ({"loss": "mse"}, "loss must be one of"),
        ({"sw_overlap": 1.0}, "sw_overlap"),
        ({"fusion": "sum"}, "fusion must be 'concat' or 'mean'"),
        ({"skip_levels": [0, 4]}, "skip_levels"),
        ({"transfer_dtype": "int8"}, "transfer_dtype"),
        ({"features": [4, 8]}, "features must be 5 or 6 positive ints"),
        ({"learning_rate": 0}, "learning_rate must be > 0"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"on_site_failure": "retry"}, "on_site_failure must be one of"),
        ({"on_site_failure": "continue"}, "need fusion='mean'"),
        ({"modality_dropout": 0.25}, "need fusion='mean'"),
        ({"modality_dropout": 1.0, "fusion": "mean"}, "modality_dropout must be in"),
        ({"checkpoint_every": -2}, "checkpoint_every must be an int >= 0"),
        ({"pipeline_delay": 2}, r"pipeline_delay must be one of \(0, 1\)"),
        ({"pipeline_delay": -1}, "pipeline_delay must be one of"),
        ({"pipeline_delay": 1.0}, "pipeline_delay must be one of"),
        ({"pipeline_delay": True}, "pipeline_delay must be one of"),
        ({"num_preview_cases": -1}, "num_preview_cases must be an int >= 0"),
        ({"experiment": "../elsewhere"}, "experiment must be a folder name"),
        ({"experiment": ""}, "experiment must be"),
        ({"task_long_poll_s": -0.1}, "task_long_poll_s must be a number of seconds"),
        ({"task_long_poll_s": 60}, "task_long_poll_s must be a number of seconds"),
        ({"amp": "yes"}, "amp must be true or false"),
        ({"resume": "false"}, "resume must be true or false"),
        ({"analytics": 1}, "analytics must be true or false"),
        ({"sites": "site-1"}, "sites must be a list of site names"),
        ({"encoder_averaging_every": -1}, "encoder_averaging_every must be an int >= 0"),
        ({"cohort_draw": "uniform"}, "cohort_draw must be one of"),
        ({"drift_correction": 0.5}, "drift_correction must be null or an object"),
        ({"drift_correction": {"mu": 0}}, r"drift_correction \{'mu': 0\}: mu must be a finite number > 0"),
        ({"drift_correction": {"rate": 1}}, "drift_correction .*unexpected keyword argument 'rate'"),
        ({"fedprox_mu": -0.01}, r"fedprox_mu must be a finite number >= 0 \(0: no proximal term\), got -0.01"),
        ({"fedprox_mu": float("nan")}, "fedprox_mu must be a finite number >= 0"),
        ({"fedprox_mu": "0.1"}, "fedprox_mu must be a finite number >= 0"),
        ({"fedprox_mu": True}, "fedprox_mu must be a finite number >= 0"),
    ],
)
def test_malformed_training_arguments_are_named(kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        TrainingSettings(**kwargs)


def test_fedprox_is_off_by_default_and_takes_a_number():
    assert TrainingSettings().fedprox_mu == 0.0
    assert TrainingSettings(fedprox_mu=1).fedprox_mu == 1.0 and isinstance(
        TrainingSettings(fedprox_mu=1).fedprox_mu, float
    )


def test_mean_fusion_allows_dropout_and_continuing():
    settings = TrainingSettings(fusion="mean", on_site_failure="continue", modality_dropout=0.3)
    assert settings.modality_dropout == 0.3 and settings.model.fusion == "mean"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoint": "latest"}, "checkpoint must be one of"),
        ({"experiment": "a/b"}, "experiment must be a folder name"),
        ({"roi_size": [16, 32, 32]}, "roi_size must be three ints >= 32"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"sw_overlap": -0.1}, "sw_overlap"),
        ({"task_timeout": 0}, "task_timeout"),
        ({"on_site_failure": "continue"}, "inference stops when a site fails"),
    ],
)
def test_malformed_inference_arguments_are_named(kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        InferenceSettings(**kwargs)
