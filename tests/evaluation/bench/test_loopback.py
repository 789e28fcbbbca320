"""bench.loopback: a raw TCP copy on 127.0.0.1 is measured, bytes and all."""

from __future__ import annotations

import math

import pytest

from splitunet.evaluation.bench.loopback import loopback_tcp_copy


@pytest.mark.parametrize("num_bytes", [1, 3 * (1 << 20) + 7])
def test_copy_moves_every_byte_and_reports_a_rate(num_bytes):
    result = loopback_tcp_copy(num_bytes, repeats=2)
    assert result["bytes"] == num_bytes
    assert result["repeats"] == 2
    assert result["seconds"] > 0 and math.isfinite(result["seconds"])
    assert result["mb_per_s"] == pytest.approx(num_bytes / result["seconds"] / 1e6)


def test_nothing_to_copy_is_an_error():
    with pytest.raises(ValueError):
        loopback_tcp_copy(0)
