"""poc.admin: the deadline kept around admin commands (no FLARE started)."""

from __future__ import annotations

import time

import pytest

from splitunet.tools.poc import PocError
from splitunet.tools.poc.admin import _call_bounded


def test_bounded_call_gives_up_and_passes_errors_through():
    with pytest.raises(PocError, match="slow thing did not finish within"):
        _call_bounded(lambda: time.sleep(5), 0.2, "slow thing")
    with pytest.raises(KeyError):
        _call_bounded(lambda: {}["missing"], 1.0, "lookup")
    assert _call_bounded(lambda: 7, 1.0, "seven") == 7
