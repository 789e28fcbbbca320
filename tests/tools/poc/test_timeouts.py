"""poc.timeouts: every bound must be positive."""

from __future__ import annotations

import pytest

from splitunet.tools.poc import PocError, PocTimeouts


def test_timeouts_must_be_positive():
    with pytest.raises(PocError, match="stop_s"):
        PocTimeouts(stop_s=0)
