"""dp.dp_settings: a job's DP-SGD settings are validated up front, each error naming the setting; the default delta
stays well below 1/N."""

from __future__ import annotations

import pytest

from splitunet.dp import DPSettings, default_delta
from splitunet.errors import SplitUNetConfigError


def test_a_job_entry_becomes_settings_and_no_entry_means_no_dp():
    settings = DPSettings.from_config({"noise_multiplier": 1.1, "max_grad_norm": 0.5, "accountant": "prv"})
    assert (settings.noise_multiplier, settings.max_grad_norm, settings.accountant) == (1.1, 0.5, "prv")
    assert settings.poisson_sampling is True and settings.target_epsilon is None
    assert DPSettings.from_config(None) is None
    assert DPSettings.from_config(settings.as_dict()) == settings


@pytest.mark.parametrize(
    "config, message",
    [
        ({"max_grad_norm": 1.0}, "exactly one of noise_multiplier"),
        ({"noise_multiplier": 1.0, "target_epsilon": 8.0}, "exactly one of noise_multiplier"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0"),
        ({"noise_multiplier": True}, "noise_multiplier must be a finite number > 0"),
        ({"target_epsilon": float("inf")}, "target_epsilon must be a finite number > 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -1}, "max_grad_norm must be a finite number > 0"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"noise_multiplier": 1.0, "accountant": "gdp"}, "accountant must be one of"),
        ({"noise_multiplier": 1.0, "poisson_sampling": "yes"}, "poisson_sampling must be true or false"),
        ({"noise_multiplier": 1.0, "clip": 1.0}, r"unknown setting\(s\) \['clip'\]"),
        ([1.0], "dp must be a mapping"),
    ],
)
def test_a_malformed_setting_is_named(config, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        DPSettings.from_config(config)


def test_the_default_delta_is_below_one_over_n_for_every_hospital_size():
    for cases in (1, 7, 100, 10_000, 10**6):
        assert default_delta(cases) <= 1e-5 and default_delta(cases) < 1.0 / cases
    assert default_delta(10**6) == pytest.approx(1e-7)
    assert DPSettings(noise_multiplier=1.0).resolve_delta(50) == default_delta(50)


def test_a_stated_delta_of_one_over_n_or_more_is_refused_naming_n():
    settings = DPSettings(noise_multiplier=1.0, delta=0.01)
    assert settings.resolve_delta(99) == 0.01
    with pytest.raises(SplitUNetConfigError, match=r"delta 0.01 is not below 1/N = 0.01 .* 100 training cases"):
        settings.resolve_delta(100)
