"""SplitSiteExecutor: a malformed client configuration fails when FLARE builds the executor, naming the argument."""

from __future__ import annotations

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.flare.executor import SplitSiteExecutor


def test_defaults_build():
    executor = SplitSiteExecutor()
    assert executor.device_name == "auto" and executor.num_threads == 0 and executor.amp is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_threads": -1}, "num_threads must be an int >= 0"),
        ({"num_threads": 1.5}, "num_threads must be an int >= 0"),
        ({"amp": 1}, "amp must be true or false"),
        ({"amp": "false"}, "amp must be true or false"),
    ],
)
def test_malformed_arguments_are_named(kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        SplitSiteExecutor(**kwargs)
