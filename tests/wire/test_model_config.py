"""model_config: validation and the wire form sent at setup."""

from __future__ import annotations

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.wire.model_config import SplitModelConfig


def test_defaults_and_round_trip():
    config = SplitModelConfig(features=(8, 16, 32, 64, 128), skip_levels=(3, 1))
    assert config.features == (8, 16, 32, 64, 128, 8)
    assert config.skip_levels == (1, 3)
    assert config.sent_levels == (1, 3, 4)
    assert SplitModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"features": (8, 16)},
        {"skip_levels": (4,)},
        {"fusion": "max"},
        {"transfer_dtype": "int8"},
        {"learning_rate": 0},
    ],
)
def test_invalid_settings_fail(kwargs):
    with pytest.raises(SplitUNetConfigError):
        SplitModelConfig(**kwargs)


def test_unknown_keys_are_named():
    with pytest.raises(SplitUNetConfigError, match="momentum"):
        SplitModelConfig.from_dict({"momentum": 0.9})
