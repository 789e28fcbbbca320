"""dp.step_time: the DP-SGD timing command reports positive, finite seconds for both arms (no timing assertion)."""

from __future__ import annotations

import math

from splitunet.dp.step_time import main


def test_the_timing_command_reports_both_arms(capsys):
    result = main(["--steps", "1", "--batch", "1", "--features", "4", "4", "4", "4", "4", "4"])
    for name in ("plain_s", "dp_s", "plain_cpu_s", "dp_cpu_s", "ratio", "cpu_ratio"):
        assert math.isfinite(result[name]) and result[name] > 0, name
    assert (result["crop"], result["batch"], result["steps"], result["threads"]) == (32, 1, 1, 1)
    assert '"dp_s"' in capsys.readouterr().out
