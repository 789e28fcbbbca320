"""The window reading: each run's level over its last scorings and the trend its own scorings imply."""

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.budget_change import DP_ROW_NOT_READ
from splitunet.evaluation.plateau import plateau_markdown, plateau_reading, window_start

STEPS = list(range(200, 1601, 200))


def _dice(mean):
    return {"TC": mean - 0.02, "WT": mean, "ET": mean + 0.02}


def _study(curves_by_key, epsilons=None):
    """A 1600-step study scored every 200 steps; ``curves_by_key``: key -> per seed, step -> mean Dice."""
    epsilons = epsilons or {}
    rows, runs = [], {}
    for key, by_seed in curves_by_key.items():
        runs[key] = {
            str(seed): {
                "dice": _dice(curve(1600)),
                "curve": [{"iteration": t, "dice": _dice(curve(t))} for t in STEPS],
            }
            for seed, curve in enumerate(by_seed)
        }
        rows.append(
            {
                "key": key,
                "label": f"{key} row",
                "target_epsilon": epsilons.get(key),
                "dice_by_seed": {seed: run["dice"] for seed, run in runs[key].items()},
            }
        )
    return {"settings": {"steps": 1600, "curve_every": 200}, "reference": rows[0]["label"], "rows": rows, "runs": runs}


def _flat(level):
    # Alternating around the level in the second half (0, +2, 0, +2, 0 points): no trend, a level 0.8 points up.
    return lambda t: level + (0.02 if t in (1000, 1400) else 0.0) - (0.3 if t < 800 else 0.0)


def _rising(start, per_step):
    return lambda t: start + per_step * t


STUDY = _study(
    {
        "ref": [_flat(0.80), _flat(0.81), _flat(0.82)],
        "flat": [_flat(0.90), _flat(0.92), _flat(0.91)],
        "rising": [_rising(0.5, 1e-4), _rising(0.5, 1.1e-4), _rising(0.5, 1.2e-4)],
        "dip": [lambda t: 0.94 - (0.13 if t == 1200 else 0.0)] * 3,
        "dp": [_flat(0.7)] * 3,
    },
    epsilons={"dp": 3.0},
)


def test_the_default_window_is_the_second_half_of_the_budget_with_its_half_point():
    assert window_start(STUDY) == 800
    reading = plateau_reading(STUDY)
    assert reading["start"] == 800 and reading["steps"] == [800, 1000, 1200, 1400, 1600]
    assert window_start({"settings": {"steps": 8}, "runs": {"a": {"0": {}}}}) is None
    with pytest.raises(SplitUNetConfigError, match="scored no learning curves"):
        plateau_reading({"settings": {"steps": 8}, "rows": [], "runs": {}})


def test_a_level_row_is_settled_at_the_mean_of_its_scorings_and_a_rising_one_is_not():
    rows = {row["key"]: row for row in plateau_reading(STUDY)["rows"]}
    flat = rows["flat"]
    # Window mean of each run: level + 2 of 5 scorings 2 points up = level + 0.008; then the mean over seeds.
    assert flat["level_by_seed"] == pytest.approx({"0": 0.908, "1": 0.928, "2": 0.918})
    assert flat["level"]["mean"]["mean"] == pytest.approx(0.918)
    assert flat["level"]["TC"]["mean"] == pytest.approx(0.898) and flat["level"]["ET"]["mean"] == pytest.approx(0.938)
    assert flat["trend"]["mean"] == pytest.approx(0.0, abs=1e-12) and flat["verdict"] == "settled"
    # The gap to the reference, paired by seed: 0.10, 0.11, 0.09.
    assert flat["gap"]["mean"] == pytest.approx(0.10) and flat["gap"]["n"] == 3 and flat["gap"]["low"] < 0.09
    assert "gap" not in rows["ref"]
    # A linear rise: the trend across the 800-step window is slope x 800, 8 to 9.6 points.
    assert rows["rising"]["trend"]["mean"] == pytest.approx(0.088) and rows["rising"]["verdict"] == "still rising"


def test_one_low_scoring_inside_the_window_costs_the_level_a_fifth_of_it_and_makes_no_trend():
    dip = {row["key"]: row for row in plateau_reading(STUDY)["rows"]}["dip"]
    assert dip["level"]["mean"]["mean"] == pytest.approx(0.94 - 0.13 / 5)
    assert dip["trend"]["mean"] == pytest.approx(0.0, abs=1e-12) and dip["verdict"] == "settled"


def test_dp_rows_are_named_as_not_read():
    reading = plateau_reading(STUDY)
    assert "dp" not in {row["key"] for row in reading["rows"]}
    assert reading["unread"] == {"dp row": DP_ROW_NOT_READ}


def test_a_window_with_fewer_than_three_scorings_is_refused_naming_the_run():
    with pytest.raises(SplitUNetConfigError, match="ref row, seed 0: 2 scoring\\(s\\) from step 1400 on"):
        plateau_reading(STUDY, start=1400)


def test_markdown_gives_level_trend_verdict_and_gap():
    text = plateau_markdown(plateau_reading(STUDY))
    assert "steps 800, 1000, 1200, 1400, 1600" in text
    assert "| flat row | 0, 1, 2 | 0.918 [" in text and "| settled | +10.0 [+7.5, +12.5] |" in text
    assert "| ref row | 0, 1, 2 | 0.818 [" in text and "(reference)" in text
    assert f"Not read: dp row ({DP_ROW_NOT_READ})." in text


def test_a_drift_treatment_is_read_on_the_levels_paired_by_seed():
    # DWCS scores 3 points above its plain row in every seed at every step but the last, where it dips 5 below: read
    # at the end the treatment would look harmful, read over the window it helps.
    def treated(level):
        return lambda t: level + 0.03 - (0.08 if t == 1600 else 0.0)

    study = _study(
        {
            "split_unet_fp32": [_flat(0.80), _flat(0.81), _flat(0.82)],
            "u_shape": [_flat(0.85), _flat(0.87), _flat(0.86)],
            "u_shape_dwcs": [treated(0.85), treated(0.87), treated(0.86)],
        }
    )
    (entry,) = plateau_reading(study)["treatments"]
    assert (entry["plain"], entry["treated"], entry["seeds"]) == ("u_shape", "u_shape_dwcs", [0, 1, 2])
    # Per seed: (level + 0.03 - 0.08 / 5) minus (level + 0.008), the same in every seed.
    assert entry["difference"]["mean"]["mean"] == pytest.approx(0.03 - 0.016 - 0.008)
    assert entry["difference"]["ET"]["mean"] == pytest.approx(0.006)
    text = plateau_markdown(plateau_reading(study))
    assert "over the same window" in text and "| u_shape_dwcs row | u_shape row | 0, 1, 2 | +0.6 [" in text
    assert text.rstrip().endswith("| helps |")
    assert plateau_reading(STUDY)["treatments"] == []
