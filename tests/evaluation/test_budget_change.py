"""The budget comparison pairs each row and seed across two studies and reads the intervals honestly."""

import json
import math

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.budget_change import (
    DP_ROW_NOT_READ,
    budget_at,
    budget_changes,
    budget_markdown,
    settle_verdict,
)
from splitunet.tools.cli import main

HELD_OUT = {"0": {"hospital-1": ["a"]}, "1": {"hospital-1": ["b"]}, "2": {"hospital-1": ["c"]}}


def _dice(mean):
    # TC, WT, ET spread around the mean so that per-region changes differ from the mean's.
    return {"TC": mean - 0.01, "WT": mean, "ET": mean + 0.01}


def _report(steps, rounds, rows, held_out=HELD_OUT, **settings):
    return {
        "steps": steps,
        "rounds": rounds,
        "reference": rows[0][1],
        "settings": {"hospitals": 3, "steps": steps, "rounds": rounds, "learning_rate": 0.002, **settings},
        "held_out": held_out,
        "rows": [
            {"key": key, "label": label, "dice_by_seed": {str(s): _dice(m) for s, m in enumerate(means)}}
            for key, label, means in rows
        ],
    }


SHORT = _report(
    400,
    10,
    [
        ("ref", "reference", [0.80, 0.82, 0.81]),
        ("flat", "flat row", [0.90, 0.91, 0.92]),
        ("rising", "rising row", [0.70, 0.72, 0.74]),
        ("noisy", "noisy row", [0.90, 0.80, 0.85]),
        ("gone", "only short", [0.5, 0.5, 0.5]),
    ],
)
LONG = _report(
    800,
    20,
    [
        ("ref", "reference", [0.85, 0.87, 0.86]),
        ("flat", "flat row", [0.901, 0.905, 0.915]),
        ("rising", "rising row", [0.80, 0.83, 0.84]),
        ("noisy", "noisy row", [0.80, 0.95, 0.86]),
        ("new", "only long", [0.9, 0.9]),
    ],
)


def test_each_row_and_seed_is_paired_and_read_by_its_interval():
    changes = budget_changes(SHORT, LONG)
    rows = {row["key"]: row for row in changes["rows"]}
    assert list(rows) == ["ref", "flat", "rising", "noisy"]  # the longer study's order; unpaired rows left out
    assert changes["shorter"] == {"steps": 400, "rounds": 10} and changes["longer"] == {"steps": 800, "rounds": 20}
    rising = rows["rising"]
    assert rising["seeds"] == [0, 1, 2]
    assert rising["mean_dice"]["1"] == pytest.approx([0.72, 0.83])
    assert rising["change"]["mean"]["mean"] == pytest.approx((0.10 + 0.11 + 0.10) / 3)
    assert rising["change"]["TC"]["mean"] == pytest.approx(rising["change"]["mean"]["mean"])
    assert rising["verdict"] == "still rising"
    assert rows["flat"]["verdict"] == "settled"
    assert rows["noisy"]["verdict"] == "not shown either way"
    # The gap to the reference: the reference rose by 5 points on every seed, the flat row stayed: its gap fell.
    assert rows["flat"]["gap_change"]["mean"] == pytest.approx((0.001 + -0.005 + -0.005) / 3 - 0.05)
    assert rows["flat"]["gap_verdict"] == "still falling"
    assert "gap_change" not in rows["ref"]


def test_verdicts_need_two_seeds_and_a_narrow_interval():
    assert settle_verdict({"mean": 0.0, "low": math.nan, "high": math.nan, "n": 1}) == "too few seeds to say"
    assert settle_verdict({"mean": 0.0, "low": -0.019, "high": 0.019, "n": 3}) == "settled"
    assert settle_verdict({"mean": 0.0, "low": -0.021, "high": 0.019, "n": 3}) == "not shown either way"
    assert settle_verdict({"mean": 0.0, "low": -0.021, "high": 0.019, "n": 3}, tolerance=0.03) == "settled"
    assert settle_verdict({"mean": -0.05, "low": -0.08, "high": -0.01, "n": 3}) == "still falling"


def test_studies_that_differ_in_more_than_the_budget_are_refused():
    with pytest.raises(SplitUNetConfigError, match="learning_rate: 0.002 against 0.001"):
        budget_changes(SHORT, {**LONG, "settings": {**LONG["settings"], "learning_rate": 0.001}})
    moved = {**HELD_OUT, "1": {"hospital-1": ["z"]}}
    with pytest.raises(SplitUNetConfigError, match="seed 1 holds out different cases"):
        budget_changes(SHORT, {**LONG, "held_out": moved})
    with pytest.raises(SplitUNetConfigError, match="different reference rows"):
        budget_changes(SHORT, {**LONG, "reference": "another"})


def test_markdown_shows_each_seed_and_the_verdicts():
    text = budget_markdown(budget_changes(SHORT, LONG))
    assert "400 steps, 10 rounds" in text and "800 steps, 20 rounds" in text
    assert "| rising row | 0, 1, 2 | 0: 0.700 → 0.800; 1: 0.720 → 0.830; 2: 0.740 → 0.840 | +10.3 [" in text
    assert "still rising" in text and "| (reference) | - |" in text


def test_rows_without_a_pair_are_named_with_the_reason():
    changes = budget_changes(SHORT, LONG)
    assert changes["unread"] == {"only short": "only in the shorter study", "only long": "only in the longer study"}
    assert "Not read: only short (only in the shorter study); only long (only in the longer study)." in (
        budget_markdown(changes)
    )


def test_the_command_writes_both_files_and_names_an_unreadable_report(tmp_path, capsys):
    (tmp_path / "short.json").write_text(json.dumps(SHORT))
    (tmp_path / "long.json").write_text(json.dumps(LONG))
    out = tmp_path / "budget"
    argv = ["compare-budgets", "--shorter", str(tmp_path / "short.json"), "--longer", str(tmp_path / "long.json")]
    assert main([*argv, "--out", str(out), "--tolerance", "3"]) == 0
    written = json.loads((out / "budget_change.json").read_text())
    assert written["tolerance"] == pytest.approx(0.03)
    assert (out / "budget_change.md").read_text() in capsys.readouterr().out
    (tmp_path / "long.json").write_text("{not json")
    assert main([*argv, "--out", str(out)]) != 0
    assert "long.json" in capsys.readouterr().err


# --- one study read at a shorter budget: its runs' learning curves (a study run with curve_every)


def _with_curves(report, steps, curve_every, dp_keys=()):
    """``report`` as a study scored every ``curve_every`` steps: seed s of a row is at ``final - (steps - t) / 1e4``
    at step t, so that every point differs."""
    runs = {}
    rows = []
    for row in report["rows"]:
        runs[row["key"]] = {}
        for seed, dice in row["dice_by_seed"].items():
            curve = [
                {"iteration": t, "dice": {r: v - (steps - t) / 1e4 for r, v in dice.items()}}
                for t in range(curve_every, steps + 1, curve_every)
            ]
            runs[row["key"]][seed] = {"dice": dice, "curve": curve}
        rows.append({**row, "target_epsilon": 3.0 if row["key"] in dp_keys else None})
    return {**report, "settings": {**report["settings"], "curve_every": curve_every}, "rows": rows, "runs": runs}


def test_a_study_read_at_a_step_of_its_curves_is_that_budgets_report():
    study = _with_curves(LONG, 800, 200, dp_keys=("new",))
    shorter = budget_at(study, 400)
    assert shorter["settings"]["steps"] == 400 and shorter["settings"]["rounds"] == 10 and shorter["steps"] == 400
    rows = {row["key"]: row for row in shorter["rows"]}
    assert rows["rising"]["dice_by_seed"]["1"]["WT"] == pytest.approx(0.83 - 0.04)
    # A DP row's noise was set for the whole budget: its first 400 steps are not a 400-step run.
    assert "new" not in rows and shorter["left_out"] == ["only long"]
    changes = budget_changes(shorter, study)
    assert changes["shorter"] == {"steps": 400, "rounds": 10}
    assert changes["unread"] == {"only long": DP_ROW_NOT_READ}  # said, not dropped silently
    assert f"Not read: only long ({DP_ROW_NOT_READ})." in budget_markdown(changes)
    assert {row["key"]: row["change"]["mean"]["mean"] for row in changes["rows"]}["flat"] == pytest.approx(0.04)


def test_whether_a_study_scored_on_the_way_is_not_what_is_compared():
    # The 800-step study scored every 200 steps, the 400-step one only at its end: still the same training.
    changes = budget_changes(SHORT, _with_curves(LONG, 800, 200))
    assert [row["key"] for row in changes["rows"]] == ["ref", "flat", "rising", "noisy"]


@pytest.mark.parametrize(
    "steps, message",
    [(300, "scored at steps \\[200, 400, 600, 800\\], not at 300"), (900, "not within"), (0, "not within")],
)
def test_a_step_the_runs_were_not_scored_at_is_refused(steps, message):
    study = _with_curves(LONG, 800, 200)
    study["settings"]["rounds"] = None
    with pytest.raises(SplitUNetConfigError, match=message):
        budget_at(study, steps)


def test_a_step_inside_a_round_is_refused_and_a_study_without_curves_names_the_option():
    with pytest.raises(SplitUNetConfigError, match="inside a round"):
        budget_at(_with_curves(LONG, 800, 20), 420)
    bare = {**LONG, "runs": {row["key"]: {s: {} for s in row["dice_by_seed"]} for row in LONG["rows"]}}
    with pytest.raises(SplitUNetConfigError, match="reference, seed 0: .*not at 400 \\(run the study with curve_every"):
        budget_at(bare, 400)


def test_the_command_reads_one_study_at_a_shorter_step(tmp_path, capsys):
    (tmp_path / "study.json").write_text(json.dumps(_with_curves(LONG, 800, 200)))
    study = str(tmp_path / "study.json")
    argv = ["compare-budgets", "--shorter", study, "--shorter-at", "600", "--longer", study, "--out", str(tmp_path)]
    assert main(argv) == 0
    written = json.loads((tmp_path / "budget_change.json").read_text())
    assert written["shorter"] == {"steps": 600, "rounds": 15} and written["longer"] == {"steps": 800, "rounds": 20}
    assert "600 steps, 15 rounds → 800 steps, 20 rounds" in capsys.readouterr().out
