"""``splitunet.evaluation.compare`` without training: settings, the table and its intervals on hand-made run results,
the shared held-out split and the secret that makes the vertical job hold out the same cases."""

from __future__ import annotations

import json
import math

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.compare import (
    CompareSettings,
    _finished,
    _vertical_held_out,
    choose_secret,
    compare_markdown,
    summarise_compare,
)
from splitunet.evaluation.intervals import t_interval

KEYS = ("split_unet_fp32", "fedavg", "u_shape_dwcs")


def _run(tc, wt, et, iterations=4, rounds=None, upload=1e6, elapsed=8.0, hd95=None):
    return {
        "dice": {"TC": tc, "WT": wt, "ET": et},
        "hd95": hd95,
        "iterations": iterations,
        "rounds": rounds,
        "upload_bytes_per_iteration": upload,
        "elapsed_s": elapsed,
        "held_out": ["BRATS_002", "BRATS_005"],
    }


@pytest.fixture
def settings():
    return CompareSettings.quick(seeds=(0, 1, 2), topologies=KEYS)


@pytest.fixture
def runs():
    return {
        "split_unet_fp32": {0: _run(0.5, 0.6, 0.4), 1: _run(0.6, 0.7, 0.5), 2: _run(0.4, 0.8, 0.3)},
        "fedavg": {
            0: _run(0.6, 0.6, 0.4, rounds=2, upload=4e6, elapsed=4.0),
            1: _run(0.8, 0.7, 0.5, rounds=2, upload=4e6, elapsed=6.0),
            2: _run(0.4, 0.9, 0.3, rounds=2, upload=4e6, elapsed=8.0),
        },
        # Seed 2 missing: the paired differences use seeds 0 and 1 only.
        "u_shape_dwcs": {0: _run(0.2, 0.3, 0.1, rounds=2, upload=None), 1: _run(0.3, 0.3, 0.2, rounds=2, upload=2e6)},
    }


def test_quick_settings_are_the_tiny_configuration():
    quick = CompareSettings.quick()
    assert quick.shape == quick.crop_size == (32, 32, 32)
    assert quick.features == (4, 8, 8, 16, 16, 4)
    assert quick.hospitals == 2 and quick.steps == 4 and quick.local_steps == 2
    assert quick.hospital_names == ["hospital-1", "hospital-2"]
    assert quick.topologies[0] == "split_unet_fp32" and len(quick.topologies) == 7


@pytest.mark.parametrize(
    "overrides",
    [
        {"topologies": ("split_unet_fp32", "nope")},
        {"topologies": ()},
        {"steps": 5, "rounds": 2},
        {"val_cases_per_hospital": 3, "cases_per_hospital": 3},
        {"seeds": ()},
        {"hospitals": 0},
    ],
)
def test_malformed_settings_are_refused(overrides):
    with pytest.raises(SplitUNetConfigError):
        CompareSettings.quick(**overrides)


def test_the_fingerprint_ignores_seeds_rows_and_threads_but_not_the_budget():
    base = CompareSettings.quick().fingerprint()
    assert CompareSettings.quick(seeds=(5, 6), topologies=("fedavg",), threads_per_party=2).fingerprint() == base
    assert CompareSettings.quick(steps=6, rounds=2).fingerprint() != base
    assert json.loads(json.dumps(base)) == base


def test_paired_differences_and_intervals_against_the_first_row(settings, runs):
    report = summarise_compare(settings, runs, {0: {"hospital-1": ["BRATS_002"], "hospital-2": ["BRATS_005"]}})
    rows = {row["key"]: row for row in report["rows"]}
    assert [row["key"] for row in report["rows"]] == list(KEYS)
    assert report["reference"] == "vertical Split-U-Net, float32 (reference)"

    reference = rows["split_unet_fp32"]
    assert reference["difference_to_reference"]["TC"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 3}

    fedavg = rows["fedavg"]
    assert fedavg["dice_mean"]["TC"] == pytest.approx(0.6)
    assert fedavg["difference_to_reference"]["TC"] == pytest.approx(t_interval([0.1, 0.2, 0.0]))
    assert fedavg["difference_to_reference"]["WT"] == pytest.approx(t_interval([0.0, 0.0, 0.1]))
    assert fedavg["difference_to_reference"]["mean"] == pytest.approx(t_interval([0.1 / 3, 0.2 / 3, 0.1 / 3]))
    assert fedavg["rounds"] == 2 and reference["rounds"] is None
    assert fedavg["upload_bytes_per_iteration"] == 4e6
    assert fedavg["seconds_per_iteration"] == pytest.approx((1.0 + 1.5 + 2.0) / 3)

    dwcs = rows["u_shape_dwcs"]
    assert dwcs["seeds"] == [0, 1]
    assert dwcs["difference_to_reference"]["TC"]["n"] == 2
    assert dwcs["difference_to_reference"]["TC"]["mean"] == pytest.approx(-0.3)
    assert dwcs["upload_bytes_per_iteration"] == 2e6  # the run without a count is left out
    assert report["held_out"] == {"0": {"hospital-1": ["BRATS_002"], "hospital-2": ["BRATS_005"]}}


def test_the_markdown_has_one_row_per_topology_with_intervals(settings, runs):
    report = summarise_compare(settings, runs, {0: {"hospital-1": ["BRATS_002"], "hospital-2": ["BRATS_005"]}})
    text = compare_markdown(report)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(KEYS)
    fedavg = next(line for line in table if line.startswith("| horizontal FedAvg |"))
    cells = [cell.strip() for cell in fedavg.strip("|").split("|")]
    assert cells[1] == "2" and cells[2:5] == ["0.600", "0.733", "0.400"]
    interval = t_interval([10.0, 20.0, 0.0])
    assert cells[6] == f"{interval['mean']:+.1f} [{interval['low']:+.1f}, {interval['high']:+.1f}]"
    assert cells[9:12] == ["-", "-", "-"]  # no HD95 given in these runs
    assert cells[12] == "4.000 MB" and cells[13] == "1.50"
    reference = next(line for line in table if line.startswith("| vertical"))
    assert "| - |" in reference  # no rounds
    assert "same 2 held-out cases" in text and "9 runs" not in text and "8 runs" in text


def test_a_single_seed_gives_a_mean_without_an_interval():
    settings = CompareSettings.quick(topologies=("split_unet_fp32", "fedavg"))
    runs = {"split_unet_fp32": {0: _run(0.5, 0.5, 0.5)}, "fedavg": {0: _run(0.6, 0.5, 0.5, rounds=2)}}
    report = summarise_compare(settings, runs)
    difference = report["rows"][1]["difference_to_reference"]["TC"]
    assert difference["mean"] == pytest.approx(0.1) and math.isnan(difference["low"])
    assert "| +10.0 |" in compare_markdown(report)


def test_a_missing_topology_gives_an_empty_row():
    settings = CompareSettings.quick(topologies=("split_unet_fp32", "u_shape"))
    report = summarise_compare(settings, {"split_unet_fp32": {0: _run(0.5, 0.5, 0.5)}})
    row = report["rows"][1]
    assert row["seeds"] == [] and math.isnan(row["dice_mean"]["TC"])
    line = [line for line in compare_markdown(report).splitlines() if line.startswith("| U-shape")][0]
    assert line.count("| - ") >= 8


def test_finished_runs_are_reused_only_under_the_same_settings(tmp_path):
    settings = CompareSettings.quick()
    run_dir = tmp_path / "seed0" / "fedavg"
    assert _finished(run_dir, settings) is None
    run_dir.mkdir(parents=True)
    run = {"settings": settings.fingerprint(), **_run(0.1, 0.2, 0.3)}
    (run_dir / "compare_run.json").write_text(json.dumps(run))
    assert _finished(run_dir, settings) == run
    assert _finished(run_dir, CompareSettings.quick(steps=8, rounds=2)) is None


@pytest.mark.parametrize("seed", [0, 3])
def test_the_chosen_secret_makes_the_vertical_job_hold_out_the_hospitals_cases(seed):
    cases = [f"BRATS_{i:03d}" for i in range(1, 13)]
    held_out = ["BRATS_002", "BRATS_009", "BRATS_011"]
    secret = choose_secret(cases, held_out, seed)
    assert _vertical_held_out(cases, secret, len(held_out), seed) == set(held_out)
    assert choose_secret(cases, held_out, seed) == secret  # reproducible


def test_no_secret_within_the_tries_is_an_error():
    cases = [f"BRATS_{i:03d}" for i in range(1, 25)]
    with pytest.raises(SplitUNetConfigError, match="hold out fewer"):
        choose_secret(cases, cases[:12], 0, max_tries=3)
    with pytest.raises(SplitUNetConfigError):
        choose_secret(cases, ["BRATS_999"], 0)


def test_hd95_is_the_mean_over_seeds_and_runs_without_it_are_left_out(settings):
    runs = {
        "split_unet_fp32": {
            0: _run(0.5, 0.5, 0.5, hd95={"TC": 10.0, "WT": 4.0, "ET": 30.0, "mean": 14.7}),
            1: _run(0.5, 0.5, 0.5, hd95={"TC": 20.0, "WT": 6.0, "ET": 50.0, "mean": 25.3}),
            2: _run(0.5, 0.5, 0.5),
        }
    }
    row = summarise_compare(settings, runs)["rows"][0]
    assert row["hd95_mean"] == {"TC": 15.0, "WT": 5.0, "ET": 40.0}
    table = compare_markdown(summarise_compare(settings, runs)).splitlines()
    line = next(row for row in table if row.startswith("| vert"))
    assert "| 15.0 | 5.0 | 40.0 |" in line
