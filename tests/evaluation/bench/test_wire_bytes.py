"""bench.wire_bytes: encoded sizes per level, direction and precision."""

from __future__ import annotations

import pytest
import torch

from splitunet.evaluation.bench.wire_bytes import byte_table, encoded_bytes

LEVELS = {0: torch.randn(2, 4, 16, 16, 16), 1: torch.randn(2, 8, 8, 8, 8), 4: torch.randn(2, 16, 1, 1, 1)}


def test_float16_is_exactly_half_of_float32():
    fp32, fp16 = encoded_bytes(LEVELS, "float32"), encoded_bytes(LEVELS, "float16")
    for level, tensor in LEVELS.items():
        assert fp32[level] == tensor.numel() * 4
        assert fp16[level] * 2 == fp32[level]


def test_int8_is_a_quarter_plus_per_channel_scale():
    fp32, int8 = encoded_bytes(LEVELS, "float32"), encoded_bytes(LEVELS, "int8")
    for level, tensor in LEVELS.items():
        batch, channels = tensor.shape[:2]
        # One byte per element, plus a float32 minimum and step per (sample, channel).
        assert int8[level] == tensor.numel() + 2 * batch * channels * 4
    assert int8[0] / fp32[0] == pytest.approx(0.25, abs=0.01)


def test_table_sums_sites_levels_and_directions():
    up = [LEVELS, {level: t * 2 for level, t in LEVELS.items()}]
    down = [{level: torch.ones_like(t) for level, t in LEVELS.items()} for _ in up]
    table = byte_table(up, down)
    assert table["num_sites"] == 2
    assert list(table["levels"]) == ["x0", "x1", "x4"]
    assert table["levels"]["x0"]["shape"] == [2, 4, 16, 16, 16]
    per_site = sum(t.numel() * 4 for t in LEVELS.values())
    assert table["total"]["up"]["float32"] == 2 * per_site
    assert table["total"]["both"]["float32"] == 4 * per_site
    assert table["total"]["both"]["float16"] * 2 == table["total"]["both"]["float32"]
    assert table["levels"]["x1"]["down"]["float32"] == 2 * LEVELS[1].numel() * 4


def test_table_needs_gradients_for_every_site():
    with pytest.raises(ValueError, match="gradients"):
        byte_table([LEVELS], [])
