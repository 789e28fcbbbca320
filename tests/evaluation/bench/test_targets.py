"""bench.targets: ratios from a report's measurements, with what dominates, and "not measured" where skipped."""

from __future__ import annotations

import pytest

from splitunet.evaluation.bench.targets import STEP_RATIO_TARGET, evaluate_targets


def _report(simulator: dict, split_dice: float = 0.80) -> dict:
    levels = {
        "x0": {
            "shape": [1],
            "up": {"float32": 300, "float16": 150, "int8": 80},
            "down": {"float32": 300, "float16": 150, "int8": 80},
        },
        "x4": {
            "shape": [1],
            "up": {"float32": 100, "float16": 50, "int8": 30},
            "down": {"float32": 100, "float16": 50, "int8": 30},
        },
    }
    totals = {p: sum(levels[k][d][p] for k in levels) for d in ("up",) for p in ("float32", "float16", "int8")}
    table = {
        "levels": levels,
        "total": {"up": totals, "down": dict(totals), "both": {p: 2 * v for p, v in totals.items()}},
        "num_sites": 4,
    }

    def arm(mean):
        return {"dice": {"TC": mean, "WT": mean, "ET": mean, "mean": mean}, "final_loss": 0.5}

    in_process = {"site_compute": 0.4, "server_compute": 0.3, "serialization": 0.05, "other": 0.05, "total": 0.8}
    return {
        "settings": {"reference_size": "crop48"},
        "sizes": [
            {"size": {"name": "crop48"}, "step_time_s": {"split_in_process": in_process}, "bytes_per_iteration": table}
        ],
        "flare": {"simulator": simulator, "poc": {"skipped": "not run (--no-poc)"}},
        "accuracy": {
            "iterations": 10,
            "arms": {
                "centralized": arm(0.81),
                "centralized_split_architecture": arm(0.83),
                "split": arm(split_dice),
                "split_int8": arm(split_dice - 0.002),
                "single_flair": arm(0.5),
                "single_t1gd": arm(0.6),
            },
        },
    }


def _by_name(targets):
    return {target["name"].split(" (")[0]: target for target in targets}


def test_step_ratio_names_the_part_that_flare_adds():
    simulator = {
        "step_time_s": {"site_compute": 0.2, "server_compute": 0.3, "waiting_transfer": 1.1, "total": 1.6},
        "iterations": 5,
    }
    targets = _by_name(evaluate_targets(_report(simulator), "float32"))
    step = targets["FLARE simulator step / in-process split step"]
    assert step["measured"] == pytest.approx(1.6 / 0.8)
    assert step["met"] is (step["measured"] <= STEP_RATIO_TARGET)
    assert step["note"].startswith("waiting_transfer")
    simulator["task_dispatch_s"] = {"first_site": 0.05, "last_site": 0.4}
    step = _by_name(evaluate_targets(_report(simulator), "float32"))["FLARE simulator step / in-process split step"]
    assert "tasks to the first site 0.050 s and to the last 0.400 s after scheduling" in step["note"]
    poc = targets["FLARE POC step / in-process split step"]
    assert poc["measured"] is None and poc["met"] is None and "--no-poc" in poc["note"]


def test_bytes_ratio_of_the_default_precision_and_the_largest_level():
    targets = _by_name(evaluate_targets(_report({"skipped": "x"}), "float32"))
    bytes_target = targets["default transport bytes / fp32 all-skips bytes"]
    assert bytes_target["measured"] == 1.0 and bytes_target["met"] is False
    assert "x0 alone is 75%" in bytes_target["note"]
    int8 = _by_name(evaluate_targets(_report({"skipped": "x"}), "int8"))[
        "default transport bytes / fp32 all-skips bytes"
    ]
    assert int8["measured"] == pytest.approx(220 / 800) and int8["met"] is False


def test_dice_targets_in_points():
    targets = _by_name(evaluate_targets(_report({"skipped": "x"}, split_dice=0.805), "float32"))
    assert targets["split - centralized mean Dice"]["measured"] == pytest.approx(-0.5)
    assert targets["split - centralized mean Dice"]["met"] is True
    same = targets["split - centralized of the same architecture mean Dice"]
    assert same["measured"] == pytest.approx(-2.5) and same["met"] is False
    single = targets["split - best single modality mean Dice"]
    assert single["measured"] == pytest.approx(20.5) and "t1gd 60.0" in single["note"]
    assert targets["split int8 wire - split float32 wire mean Dice"]["measured"] == pytest.approx(-0.2)


def test_an_int8_default_is_compared_with_a_float32_arm():
    report = _report({"skipped": "x"}, split_dice=0.805)
    arms = report["accuracy"]["arms"]
    arms["split_float32"] = arms.pop("split_int8")
    arms["split_float32"]["dice"]["mean"] = 0.815
    targets = _by_name(evaluate_targets(report, "int8"))
    transport = targets["split int8 wire - split float32 wire mean Dice"]
    assert transport["measured"] == pytest.approx(-1.0) and transport["met"] is False
    assert "the job's default" in transport["note"]


@pytest.mark.parametrize("int8_bytes, met", [(100.2, True), (102.5, False)])
def test_bytes_goal_is_judged_at_its_two_decimals(int8_bytes, met):
    report = _report({"skipped": "x"})
    table = report["sizes"][0]["bytes_per_iteration"]
    table["total"]["both"] = {"float32": 400.0, "float16": 200.0, "int8": int8_bytes}
    target = _by_name(evaluate_targets(report, "int8"))["default transport bytes / fp32 all-skips bytes"]
    assert target["measured"] == pytest.approx(int8_bytes / 400) and target["met"] is met
    assert f"{int8_bytes / 400:.4f}x" in target["note"]


def test_repeated_wire_pair_is_judged_on_the_mean_of_paired_differences():
    report = _report({"skipped": "x"}, split_dice=0.805)
    arms = report["accuracy"]["arms"]

    def runs(means):
        return [{"seed": seed, "dice": {"mean": mean}, "final_loss": 0.5} for seed, mean in enumerate(means)]

    arms["split_float32"] = arms.pop("split_int8")
    arms["split"]["repeats"] = runs([0.805, 0.80, 0.79])
    # Seed 2 of the float32 arm is missing: only seeds both arms ran are paired.
    arms["split_float32"]["repeats"] = runs([0.815, 0.80])
    transport = _by_name(evaluate_targets(report, "int8"))["split int8 wire - split float32 wire mean Dice"]
    assert transport["measured"] == pytest.approx(-0.5) and transport["met"] is True
    assert "mean of 2 paired runs (seeds [0, 1]): -1.00, +0.00" in transport["note"]
    assert "final training losses (int8 / float32): 0.5000 / 0.5000, 0.5000 / 0.5000" in transport["note"]


def test_repeated_same_architecture_arm_is_judged_on_paired_differences():
    report = _report({"skipped": "x"}, split_dice=0.80)
    arms = report["accuracy"]["arms"]

    def runs(means, loss):
        return [{"seed": seed, "dice": {"mean": mean}, "final_loss": loss} for seed, mean in enumerate(means)]

    # Seed 0 alone would say -3 points; the three pairs say -1 on average.
    arms["split"]["repeats"] = runs([0.80, 0.70, 0.60], 0.4)
    arms["centralized_split_architecture"]["repeats"] = runs([0.83, 0.70, 0.60], 0.3)
    target = _by_name(evaluate_targets(report, "int8"))["split - centralized of the same architecture mean Dice"]
    assert target["measured"] == pytest.approx(-1.0) and target["met"] is True
    assert "mean of 3 paired runs (seeds [0, 1, 2]): -3.00, +0.00, +0.00" in target["note"]
    assert "final training losses (split / centralized): 0.4000 / 0.3000" in target["note"]


def test_same_architecture_arm_without_repeats_is_one_difference():
    target = _by_name(evaluate_targets(_report({"skipped": "x"}, split_dice=0.80), "int8"))[
        "split - centralized of the same architecture mean Dice"
    ]
    assert target["measured"] == pytest.approx(-3.0) and target["met"] is False
    assert "paired runs" not in target["note"]
