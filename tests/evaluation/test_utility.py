"""utility: paired-seed Dice differences with intervals, and a study that reuses its finished runs."""

from __future__ import annotations

import json
import math

import pytest

from splitunet.evaluation import utility
from splitunet.evaluation.sweep import SweepSetting
from splitunet.evaluation.utility import paired_interval, run_utility, summarise_utility, utility_markdown

REFERENCE = SweepSetting("reference", "split_unet_fp32")
DEFENDED = SweepSetting("defended", "split_unet_protected")


def test_paired_interval_is_students_t():
    interval = paired_interval([0.01, 0.03, 0.02])
    # mean 0.02, sd 0.01, t(2) = 4.303: half-width 4.303 * 0.01 / sqrt(3)
    assert interval["mean"] == pytest.approx(0.02)
    assert interval["high"] - interval["mean"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert interval["n"] == 3
    single = paired_interval([0.5])
    assert single["mean"] == 0.5 and math.isnan(single["low"])
    assert paired_interval([])["n"] == 0


def _summary(tc, wt, et, history=((100, 0.1),)):
    return {
        "dice": {"TC": tc, "WT": wt, "ET": et},
        "history": [{"iteration": i, "dice": {"TC": d, "WT": d, "ET": d}} for i, d in history],
        "activation_bytes_per_iteration": 1000,
        "elapsed_s": 1.0,
        "iterations": 300,
        "optimizer": "AdamW",
        "simulator_exit_code": 0,
    }


def _fake_runs(monkeypatch, record, dice=lambda settings: _summary(0.5, 0.6, 0.4)):
    """Replace the study's training by a fake that calls ``record(run_dir, settings, data_dir)`` and writes the
    ``results.json`` of ``dice(settings)`` at the run's budget."""

    def fake_run_demo(run_dir, settings, job_dir, data_dir):
        record(run_dir, settings, data_dir)
        summary = {**dice(settings), "iterations": settings.server_args["num_iterations"]}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(utility, "run_demo", fake_run_demo)


def test_differences_are_paired_by_seed():
    runs = {
        "reference": {0: _summary(0.8, 0.9, 0.7), 1: _summary(0.6, 0.7, 0.5), 2: _summary(0.7, 0.8, 0.6)},
        # Exactly 0.05 below the reference in every region under every seed, whatever the seed's level.
        "defended": {0: _summary(0.75, 0.85, 0.65), 1: _summary(0.55, 0.65, 0.45), 2: _summary(0.65, 0.75, 0.55)},
    }
    report = summarise_utility((REFERENCE, DEFENDED), runs, (0, 1, 2), 300)
    difference = report["rows"][1]["difference_to_reference"]
    for region in ("TC", "WT", "ET", "mean"):
        assert difference[region]["mean"] == pytest.approx(-0.05)
        assert difference[region]["high"] - difference[region]["low"] == pytest.approx(0, abs=1e-9)
    assert report["rows"][0]["mean_dice_at_validation"] == {"100": pytest.approx(0.1)}
    table = utility_markdown(report)
    assert "| defended | 0.650 | 0.750 | 0.550 | -5.0 [-5.0, -5.0] |" in table
    assert "| defended | 0.750 | 0.550 | 0.650 |" in table  # each seed's mean Dice


def test_a_study_reuses_finished_runs_and_pairs_data_by_seed(tmp_path, monkeypatch):
    calls = []
    _fake_runs(
        monkeypatch,
        lambda run_dir, settings, data_dir: calls.append(
            (run_dir.name, settings.seed, data_dir.name, settings.server_args["num_iterations"])
        ),
        lambda settings: _summary(0.5 + 0.1 * settings.seed, 0.6, 0.4),
    )
    run_utility(tmp_path, (REFERENCE,), (0, 1), iterations=7)
    assert [(seed, data) for _, seed, data, _ in calls] == [(0, "data_seed0"), (1, "data_seed1")]
    calls.clear()
    report = run_utility(tmp_path, (REFERENCE, DEFENDED), (0, 1), iterations=7)
    # Only the new setting trains; the reference's runs are read back.
    assert [name for name, *_ in calls] == ["split_unet_protected__defended"] * 2
    assert report["rows"][1]["difference_to_reference"]["TC"]["mean"] == pytest.approx(0)
    assert (tmp_path / "utility.md").is_file()
    calls.clear()
    run_utility(tmp_path, (REFERENCE,), (0,), iterations=8)  # another budget is another run
    assert len(calls) == 1


def test_a_run_that_adams_coupled_decay_trained_is_trained_again(tmp_path, monkeypatch):
    # A results.json without the optimiser's name comes from before AdamW: its deep blocks had collapsed.
    calls = []
    _fake_runs(monkeypatch, lambda run_dir, settings, data_dir: calls.append(run_dir.name))
    run_utility(tmp_path, (REFERENCE,), (0,), iterations=7)
    results = next(tmp_path.glob("seed0/*/results.json"))
    old = {key: value for key, value in json.loads(results.read_text()).items() if key != "optimizer"}
    results.write_text(json.dumps(old))
    run_utility(tmp_path, (REFERENCE,), (0,), iterations=7)
    assert len(calls) == 2
    run_utility(tmp_path, (REFERENCE,), (0,), iterations=7)  # the retrained run records AdamW: reused
    assert len(calls) == 2


def test_a_study_takes_over_the_seeds_of_an_earlier_report_and_trains_only_new_settings(tmp_path, monkeypatch):
    calls = []
    _fake_runs(
        monkeypatch,
        lambda run_dir, settings, data_dir: calls.append((run_dir.parent.name, run_dir.name)),
        lambda settings: _summary(0.4 + 0.1 * settings.seed, 0.6, 0.4, history=((100, 0.25 + settings.seed),)),
    )
    run_utility(tmp_path / "first", (REFERENCE,), (0, 1, 2), iterations=7)
    earlier = tmp_path / "first" / "utility.json"
    calls.clear()
    report = run_utility(tmp_path / "second", (REFERENCE, DEFENDED), (0, 1, 2), iterations=7, reuse=earlier)
    # The reference's three runs come from the earlier report; only the new setting trains, paired by seed.
    assert calls == [(f"seed{seed}", "split_unet_protected__defended") for seed in (0, 1, 2)]
    reference, defended = report["rows"]
    assert reference["dice_by_seed"] == json.loads(earlier.read_text())["rows"][0]["dice_by_seed"]
    assert reference["curve_by_seed"] == {"0": {"100": 0.25}, "1": {"100": 1.25}, "2": {"100": 2.25}}
    assert defended["difference_to_reference"]["TC"]["mean"] == pytest.approx(0)
    assert report["optimizer"] == "AdamW"
    # Reused again from the second report: the per-seed curves carry over.
    again = run_utility(
        tmp_path / "third", (REFERENCE,), (0, 1, 2), iterations=7, reuse=tmp_path / "second/utility.json"
    )
    assert again["rows"][0]["curve_by_seed"] == reference["curve_by_seed"] and len(calls) == 3
    with pytest.raises(ValueError, match="made at 7 iterations with optimiser 'AdamW'; this study trains 8"):
        run_utility(tmp_path / "fourth", (REFERENCE,), (0,), iterations=8, reuse=earlier)
    # Runs keyed with another secret (an older report's random one) were split and cropped otherwise: refused.
    content = json.loads(earlier.read_text())
    content["data_fingerprints"]["1"] = "0" * 16
    del content["data_fingerprints"]["2"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"keyed the cases of seeds \[1, 2\] with another or an unrecorded secret"):
        run_utility(tmp_path / "fifth", (REFERENCE,), (0, 1, 2), iterations=7, reuse=other)
    # A seed's data is keyed the same way in every study: the secret derives from the seed.
    assert (tmp_path / "first/data_seed1/case_key_secret.txt").read_text() == (
        tmp_path / "second/data_seed1/case_key_secret.txt"
    ).read_text()


def test_a_settings_executor_arguments_reach_its_runs_and_name_its_row(tmp_path, monkeypatch):
    received = []
    _fake_runs(monkeypatch, lambda run_dir, settings, data_dir: received.append(settings.client_args))
    strong = SweepSetting("nopeek 1", "split_unet_nopeek", client_args={"nopeek": {"weight": 1.0}})
    report = run_utility(tmp_path, (REFERENCE, strong), (0,), iterations=7)
    assert received == [{}, {"nopeek": {"weight": 1.0}}]
    assert "client_args" not in report["rows"][0]  # rows without them keep the keys they had
    assert SweepSetting.from_row(report["rows"][1]) == strong
    assert SweepSetting.from_row(report["rows"][1]).key() != SweepSetting("nopeek 1", "split_unet_nopeek").key()
