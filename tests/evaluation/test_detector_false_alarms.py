"""splitunet detector: every site's detector judges every iteration of honest runs; rates with Wilson intervals."""

import json

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.detector_false_alarms import measure_false_alarms, replay_false_alarms
from splitunet.evaluation.intervals import proportion_interval
from splitunet.filters import GradientDetector
from splitunet.wire.model_config import SplitModelConfig

SMALL = SplitModelConfig(features=(4, 8, 8, 16, 16, 4))


def test_wilson_interval_matches_hand_computed_values():
    none = proportion_interval(0, 3)
    assert (none["rate"], none["low"]) == (0.0, 0.0) and none["high"] == pytest.approx(0.5615, abs=1e-4)
    half = proportion_interval(5, 10)
    assert (half["low"], half["high"]) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert proportion_interval(0, 0)["n"] == 0


def test_every_site_is_judged_at_every_iteration_and_refusals_are_counted(tiny_parties, tmp_path):
    # x0's gradient is always larger per element than the bottleneck's: a lower bound of 10 decades refuses them all
    # (the shipped bounds' false alarms are what the command measures, over whole runs).
    report = measure_false_alarms(
        tiny_parties, tmp_path, seeds=(0,), iterations=2, crop_size=(32, 32, 32), crops=2, config=SMALL,
        make_detector=lambda: GradientDetector(level_ratio_bounds={"x0": [10.0, 11.0]}),
    )  # fmt: skip
    assert [(run["site"], run["tested"], run["flagged"]) for run in report["runs"]] == [
        (f"site-{i}", 2, 2) for i in range(1, 5)
    ]
    assert "level_ratio x0" in report["runs"][0]["first_reason"]
    assert report["pooled"]["n"] == 8 and report["pooled"]["rate"] == 1.0
    assert json.loads((tmp_path / "detector.json").read_text())["iterations"] == 2
    assert "| all | 8 | 8 | 100.00 %" in (tmp_path / "detector.md").read_text()
    # Where the honest statistics lay, beside the bounds that refused them: what a recalibration starts from.
    envelope, bounds = report["envelope"], report["bounds"]
    assert envelope["sets"] == 8 and envelope["level_ratio"]["x0"]["max"] < 10.0
    assert bounds["level_ratio"]["x0"] == [10.0, 11.0]
    assert "| x0 |" in (tmp_path / "detector.md").read_text() and "[10, 11]" in (tmp_path / "detector.md").read_text()


def test_a_replay_of_the_recorded_calls_gives_the_live_verdicts_and_judges_other_bounds(tiny_parties, tmp_path):
    # Bounds that refuse some calls and accept others, with a drift test whose baseline depends on which calls
    # were accepted: the replay must reach every verdict the live detectors reached, in the same order.
    live_dir, replay_dir = tmp_path / "live", tmp_path / "replay"
    first = measure_false_alarms(
        tiny_parties, live_dir, seeds=(0, 1), iterations=4, crop_size=(32, 32, 32), crops=2, config=SMALL
    )
    ratios = sorted(
        call["level_ratio"]["x1"]
        for run in json.loads((live_dir / "detector_calls.json").read_text())["runs"]
        for call in run["calls"]
    )
    middle = ratios[len(ratios) // 2]  # refuses about half of the calls

    def make():
        return GradientDetector(level_ratio_bounds={"x1": [middle, None]}, drift_threshold=0.01, warmup=1)

    live = measure_false_alarms(
        tiny_parties, live_dir, seeds=(0, 1), iterations=4, crop_size=(32, 32, 32), crops=2, config=SMALL,
        make_detector=make,
    )  # fmt: skip
    replayed = replay_false_alarms(live_dir / "detector_calls.json", replay_dir, make_detector=make)

    def verdicts(report):
        return [(r["seed"], r["site"], r["flagged_iterations"]) for r in report["runs"]]

    assert verdicts(replayed) == verdicts(live)
    # The live reason is the filter's whole message; the replay gives the statistic, value and bound it names.
    assert all(
        mine["first_reason"] in theirs["first_reason"]
        for mine, theirs in zip(replayed["runs"], live["runs"])
        if theirs["flagged"]
    )
    assert 0 < live["pooled"]["rate"] < 1
    assert replayed["replayed_from"].endswith("detector_calls.json")
    assert "Replayed from" in (replay_dir / "detector.md").read_text()
    # Other bounds on the same gradients, and only the held-out seed.
    held_out = replay_false_alarms(
        live_dir / "detector_calls.json", replay_dir, seeds=[1],
        make_detector=lambda: GradientDetector(level_ratio_bounds={}, max_dc_fraction={}, drift_threshold=None),
    )  # fmt: skip
    assert held_out["seeds"] == [1] and held_out["pooled"] == {**held_out["pooled"], "n": 16, "rate": 0.0}
    assert first["pooled"]["n"] == 32


def test_a_replay_refuses_to_overwrite_the_recorded_report(tiny_parties, tmp_path):
    measure_false_alarms(
        tiny_parties, tmp_path, seeds=(0,), iterations=1, crop_size=(32, 32, 32), crops=2, config=SMALL
    )
    with pytest.raises(SplitUNetConfigError, match="another folder"):
        replay_false_alarms(tmp_path / "detector_calls.json", tmp_path)
    with pytest.raises(SplitUNetConfigError, match="no run of seeds"):
        replay_false_alarms(tmp_path / "detector_calls.json", tmp_path / "other", seeds=[7])
