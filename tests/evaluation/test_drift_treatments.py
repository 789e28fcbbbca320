"""``splitunet.evaluation.drift_treatments``: each treatment paired with its own plain row, seed by seed, and a
verdict that only an interval excluding zero can give."""

from __future__ import annotations

import math

import pytest

from splitunet.evaluation.compare import CompareSettings, compare_markdown, summarise_compare
from splitunet.evaluation.drift_treatments import (
    DP_TREATMENTS,
    DRIFT_TREATMENTS,
    treatment_differences,
    treatment_markdown,
)
from splitunet.evaluation.intervals import t_interval


def _row(key, label, by_seed):
    return {
        "key": key,
        "label": label,
        "dice_by_seed": {str(seed): {"TC": tc, "WT": wt, "ET": et} for seed, (tc, wt, et) in by_seed.items()},
    }


def _is_dwcs(key: str) -> bool:
    from splitunet.evaluation.compare import _BY_KEY

    # fedavg_dwcs carries DWCS in its job (fedavg_unet_dwcs), the others in their options.
    return key == "fedavg_dwcs" or "dwcs" in _BY_KEY[key].options


def test_every_treatment_is_paired_with_a_plain_row_of_its_own_topology():
    from splitunet.evaluation.compare import _BY_KEY

    against_plain = [(plain, treated) for plain, treated in DRIFT_TREATMENTS if not _BY_KEY[plain].options]
    for plain, treated in DRIFT_TREATMENTS:
        assert _BY_KEY[plain].kind == _BY_KEY[treated].kind
        assert _BY_KEY[treated].options.keys() <= {"dwcs", "fedprox"}
    # Every DWCS and FedProx row of the comparison has its pair (fedavg_dwcs carries DWCS in its job, not options).
    treated = {key for key, topology in _BY_KEY.items() if {"dwcs", "fedprox"} & topology.options.keys()}
    assert treated | {"fedavg_dwcs"} == {t for _, t in against_plain}


def test_dwcs_is_also_set_against_fedprox_wherever_both_rows_exist():
    from splitunet.evaluation.compare import _BY_KEY

    against_fedprox = {(plain, treated) for plain, treated in DRIFT_TREATMENTS if _BY_KEY[plain].options}
    expected = {
        (fedprox, dwcs)
        for fedprox, fedprox_row in _BY_KEY.items()
        if "fedprox" in fedprox_row.options
        for dwcs, dwcs_row in _BY_KEY.items()
        if _is_dwcs(dwcs) and dwcs_row.kind == fedprox_row.kind
    }
    assert against_fedprox == expected and len(expected) == 2
    # After the treatments against plain rows, so each table reads "does it help?" before "which of the two?".
    keys = list(DRIFT_TREATMENTS)
    assert all(keys.index(pair) >= len(keys) - len(expected) for pair in expected)


def test_dwcs_against_fedprox_is_dwcs_minus_fedprox_and_rendered_after_the_plain_pairs():
    rows = [
        _row("splitfed", "SplitFed", {0: (0.5, 0.5, 0.5), 1: (0.5, 0.5, 0.5), 2: (0.5, 0.5, 0.5)}),
        _row("splitfed_dwcs", "SplitFed + DWCS", {0: (0.6, 0.6, 0.6), 1: (0.62, 0.62, 0.62), 2: (0.61, 0.61, 0.61)}),
        _row("splitfed_fedprox", "SplitFed + FedProx", {0: (0.7, 0.7, 0.7), 1: (0.7, 0.7, 0.7), 2: (0.7, 0.7, 0.7)}),
    ]
    entries = treatment_differences(rows)
    assert [(e["plain"], e["treated"]) for e in entries] == [
        ("splitfed", "splitfed_dwcs"),
        ("splitfed", "splitfed_fedprox"),
        ("splitfed_fedprox", "splitfed_dwcs"),
    ]
    assert entries[-1]["difference"]["mean"] == pytest.approx(t_interval([-0.1, -0.08, -0.09]))
    last = treatment_markdown(entries).splitlines()[-1]
    assert last.startswith("| SplitFed + DWCS | SplitFed + FedProx | 0, 1, 2 |") and last.endswith("| hurts |")


def test_the_difference_is_treated_minus_plain_over_the_seeds_both_ran():
    rows = [
        _row("splitfed", "SplitFed", {0: (0.5, 0.6, 0.7), 1: (0.6, 0.6, 0.6), 2: (0.4, 0.5, 0.6)}),
        # Seed 2 missing: only seeds 0 and 1 pair.
        _row("splitfed_dwcs", "SplitFed + DWCS", {0: (0.6, 0.6, 0.7), 1: (0.8, 0.6, 0.6)}),
        _row("fedavg", "FedAvg", {0: (0.5, 0.5, 0.5)}),  # no treated row: no entry
    ]
    (entry,) = treatment_differences(rows)
    assert (entry["plain"], entry["treated"], entry["seeds"]) == ("splitfed", "splitfed_dwcs", [0, 1])
    assert entry["difference"]["TC"] == pytest.approx(t_interval([0.1, 0.2]))
    assert entry["difference"]["WT"]["mean"] == pytest.approx(0.0)
    assert entry["difference"]["mean"] == pytest.approx(t_interval([0.1 / 3, 0.2 / 3]))


@pytest.mark.parametrize(
    ("treated_seeds", "verdict"),
    [
        ({0: (0.6, 0.6, 0.6), 1: (0.62, 0.62, 0.62), 2: (0.61, 0.61, 0.61)}, "helps"),
        ({0: (0.4, 0.4, 0.4), 1: (0.38, 0.38, 0.38), 2: (0.39, 0.39, 0.39)}, "hurts"),
        ({0: (0.6, 0.6, 0.6), 1: (0.4, 0.4, 0.4), 2: (0.52, 0.52, 0.52)}, "no difference shown"),
        ({0: (0.9, 0.9, 0.9)}, "too few seeds to say"),
    ],
)
def test_the_verdict_needs_an_interval_that_excludes_zero(treated_seeds, verdict):
    plain = _row("u_shape", "U-shape", {0: (0.5, 0.5, 0.5), 1: (0.5, 0.5, 0.5), 2: (0.5, 0.5, 0.5)})
    entries = treatment_differences([plain, _row("u_shape_dwcs", "U-shape + DWCS", treated_seeds)])
    line = treatment_markdown(entries).splitlines()[-1]
    assert line.startswith("| U-shape + DWCS | U-shape |") and line.endswith(f"| {verdict} |")


def test_the_comparison_report_carries_the_treatments_and_renders_them_below_its_table():
    settings = CompareSettings.quick(seeds=(0, 1), topologies=("split_unet_fp32", "fedavg", "fedprox"))
    run = {"iterations": 4, "rounds": 2, "upload_bytes_per_iteration": 1e6, "elapsed_s": 4.0, "held_out": []}
    runs = {
        "split_unet_fp32": {s: {**run, "dice": {"TC": 0.5, "WT": 0.5, "ET": 0.5}, "rounds": None} for s in (0, 1)},
        "fedavg": {s: {**run, "dice": {"TC": 0.5, "WT": 0.6, "ET": 0.5 + s / 10}} for s in (0, 1)},
        "fedprox": {s: {**run, "dice": {"TC": 0.4, "WT": 0.6, "ET": 0.5}} for s in (0, 1)},
    }
    report = summarise_compare(settings, runs)
    (entry,) = report["drift_treatments"]
    assert entry["treated"] == "fedprox" and entry["difference"]["TC"]["mean"] == pytest.approx(-0.1)
    assert math.isfinite(entry["difference"]["mean"]["low"])
    text = compare_markdown(report)
    assert "| horizontal FedAvg + FedProx | horizontal FedAvg | 0, 1 | " in text
    # A report written before the treatments were stored renders them from its rows all the same.
    del report["drift_treatments"]
    assert compare_markdown(report) == text


def test_every_dp_row_is_paired_with_its_topology_without_dp():
    from splitunet.evaluation.compare import _BY_KEY

    for plain, treated in DP_TREATMENTS:
        assert _BY_KEY[plain].kind == _BY_KEY[treated].kind
        assert "dp_epsilon" not in _BY_KEY[plain].options and "dp_epsilon" in _BY_KEY[treated].options
    dp_rows = {key for key, topology in _BY_KEY.items() if "dp_epsilon" in topology.options}
    assert dp_rows == {treated for _, treated in DP_TREATMENTS}


def test_the_comparison_report_carries_the_dp_cost_and_renders_it_apart_from_the_drift_treatments():
    settings = CompareSettings.quick(seeds=(0, 1, 2), topologies=("split_unet_fp32", "fedavg", "fedavg_dp_eps3"))
    run = {"iterations": 4, "rounds": 2, "upload_bytes_per_iteration": 1e6, "elapsed_s": 4.0, "held_out": []}
    runs = {
        "split_unet_fp32": {s: {**run, "dice": {"TC": 0.5, "WT": 0.5, "ET": 0.5}, "rounds": None} for s in (0, 1, 2)},
        "fedavg": {s: {**run, "dice": {"TC": 0.9, "WT": 0.9, "ET": 0.9 - s / 100}} for s in (0, 1, 2)},
        "fedavg_dp_eps3": {s: {**run, "dice": {"TC": 0.1 + s / 100, "WT": 0.2, "ET": 0.1}} for s in (0, 1, 2)},
    }
    report = summarise_compare(settings, runs)
    assert report["drift_treatments"] == []
    (entry,) = report["dp_costs"]
    assert (entry["plain"], entry["treated"], entry["seeds"]) == ("fedavg", "fedavg_dp_eps3", [0, 1, 2])
    assert entry["difference"]["WT"]["mean"] == pytest.approx(-0.7)
    text = compare_markdown(report)
    assert "What DP-SGD costs" in text and "drift treatment" not in text
    cost_row = "| horizontal FedAvg + DP-SGD, target ε 3 | horizontal FedAvg | 0, 1, 2 |"
    line = next(line for line in text.splitlines() if line.startswith(cost_row))
    assert line.endswith("| hurts |")
