"""``splitunet.evaluation.compare`` without training: settings, the table and its intervals on hand-made run results,
the shared held-out split, the secrets that make the vertical and SplitFed jobs hold out the same cases, what the
SplitFed, FedAvg + DWCS and DP rows hand their runners (the runners stubbed), the epsilon column, and the reuse of
runs finished under an earlier version's settings."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from splitunet.data.case_keys import case_key
from splitunet.data.site_groups import group_sites
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.compare import (
    _BY_KEY,
    TOPOLOGIES,
    CompareData,
    CompareSettings,
    _cohort_held_out,
    _finished,
    _run_fedavg,
    _run_splitfed,
    _run_u_shape,
    _run_vertical,
    _vertical_held_out,
    choose_cohort_secret,
    choose_secret,
    compare_markdown,
    curve_markdown,
    prepare_compare_data,
    summarise_compare,
)
from splitunet.evaluation.intervals import t_interval
from splitunet.server.cohorts import match_cohorts
from splitunet.server.decoder_inputs import modality_groups
from splitunet.tools.jobs import resolve_jobs

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
    assert quick.topologies == tuple(topology.key for topology in TOPOLOGIES)


@pytest.mark.parametrize(
    "overrides",
    [
        {"topologies": ("split_unet_fp32", "nope")},
        {"topologies": ()},
        {"steps": 5, "rounds": 2},
        {"val_cases_per_hospital": 3, "cases_per_hospital": 3},
        {"seeds": ()},
        {"hospitals": 0},
        {"hospitals": 1, "topologies": ("split_unet", "splitfed")},  # one hospital: one site per modality
        {"fedprox_mu": -0.01},
        {"fedprox_mu": float("nan")},
        {"curve_every": -2},
        {"curve_every": 3},  # does not divide the 4 steps
        {"steps": 8, "rounds": 2, "curve_every": 2},  # rounds of 4 steps: a FedAvg curve cannot score at 2
    ],
)
def test_malformed_settings_are_refused(overrides):
    with pytest.raises(SplitUNetConfigError):
        CompareSettings.quick(**overrides)


def test_a_curve_scores_every_multiple_of_curve_every_and_enters_the_fingerprint():
    assert CompareSettings.quick().curve_steps == [4]
    assert CompareSettings.quick(steps=8, rounds=4, curve_every=4).curve_steps == [4, 8]
    assert CompareSettings.quick(curve_every=2).fingerprint()["curve_every"] == 2
    assert "curve_every" not in CompareSettings.quick().fingerprint()


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


def test_the_notes_say_what_a_splitfed_encoder_trains_only_when_there_is_a_splitfed_row():
    runs = {"split_unet": {0: _run(0.5, 0.5, 0.5)}, "splitfed": {0: _run(0.4, 0.5, 0.5, rounds=2)}}
    with_splitfed = CompareSettings.quick(topologies=("split_unet", "splitfed"))
    assert "1/hospitals of the steps" in compare_markdown(summarise_compare(with_splitfed, runs))
    without = CompareSettings.quick(topologies=("split_unet",))
    assert "1/hospitals" not in compare_markdown(summarise_compare(without, runs))


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


# --- the rows: each drift treatment beside its topology's plain row


def test_each_drift_treatment_sits_beside_its_topologys_plain_row():
    keys = [topology.key for topology in TOPOLOGIES]
    assert keys[0] == "split_unet_fp32" and keys[-1] == "centralized"
    for plain, treated in (
        ("split_unet", ["split_unet_dp_eps3"]),
        ("splitfed", ["splitfed_dwcs", "splitfed_fedprox"]),
        ("fedavg", ["fedprox", "fedavg_dwcs", "fedavg_dp_eps1", "fedavg_dp_eps3", "fedavg_dp_eps10"]),
        ("u_shape", ["u_shape_dwcs"]),
    ):
        start = keys.index(plain) + 1
        assert keys[start : start + len(treated)] == treated
        assert {_BY_KEY[key].kind for key in treated} == {_BY_KEY[plain].kind}
    jobs = resolve_jobs()
    assert all(topology.job in jobs for topology in TOPOLOGIES if topology.job)
    dwcs = jobs["fedavg_unet_dwcs"].workflow
    assert dwcs.path == "splitunet.horizontal.DriftCorrectedFedAvg" and dwcs.args["drift_correction"] == {}
    assert {_BY_KEY[key].job for key in ("splitfed", "splitfed_dwcs", "splitfed_fedprox")} == {"split_unet_splitfed"}
    assert _BY_KEY["splitfed_fedprox"].options == {"fedprox": True}
    # The DP rows: their jobs train with DP-SGD, at the target epsilon the key names.
    private = {key: _BY_KEY[key] for key in keys if "dp_epsilon" in _BY_KEY[key].options}
    assert {key: t.options["dp_epsilon"] for key, t in private.items()} == {
        "split_unet_dp_eps3": 3.0,
        "fedavg_dp_eps1": 1.0,
        "fedavg_dp_eps3": 3.0,
        "fedavg_dp_eps10": 10.0,
    }
    assert all(jobs[t.job].executor_args.get("dp") for t in private.values())
    assert {t.job for t in private.values()} == {"split_unet_dp", "fedavg_unet_dp"}


# --- SplitFed's held-out cases: one secret for every cohort

COHORT_CASES = {
    "hospital-1": [f"BRATS_{i:03d}" for i in range(1, 6)],
    "hospital-2": [f"BRATS_{i:03d}" for i in range(6, 11)],
    "hospital-3": [f"BRATS_{i:03d}" for i in range(11, 16)],
}
COHORT_HELD_OUT = {
    "hospital-1": ["BRATS_002", "BRATS_005"],
    "hospital-2": ["BRATS_006", "BRATS_009"],
    "hospital-3": ["BRATS_013", "BRATS_014"],
}


def _server_held_out(cases, secret, num_val, seed):
    """What the SplitFed controller holds out: its own cohort matching and split, on the keys the sites send."""
    names, sites = list(cases), group_sites(len(cases))
    site_cases = {
        site: {case_key(case, secret): {"shape": [8, 8, 8], "affine_digest": "grid"} for case in cases[names[group]]}
        for site, (_, group) in sites.items()
    }
    labels = {key: entry for held in site_cases.values() for key, entry in held.items()}
    modality_of = {site: modality for site, (modality, _) in sites.items()}
    match = match_cohorts("server", labels, site_cases, modality_groups(modality_of))
    to_case = {case_key(case, secret): case for ids in cases.values() for case in ids}
    return {
        frozenset(cohort.sites): {to_case[key] for key in cohort.val_keys}
        for cohort in match.split(labels, site_cases, modality_of, str, str, num_val, seed)
    }


@pytest.mark.parametrize("seed", [0, 3])
def test_the_cohort_secret_makes_each_hospitals_cohort_hold_out_its_cases(seed):
    secret = choose_cohort_secret(COHORT_CASES, COHORT_HELD_OUT, seed)
    names, sites = list(COHORT_CASES), group_sites(len(COHORT_CASES))
    expected = {
        frozenset(site for site, (_, group) in sites.items() if group == index): set(COHORT_HELD_OUT[name])
        for index, name in enumerate(names)
    }
    assert _server_held_out(COHORT_CASES, secret, 2, seed) == expected
    assert _cohort_held_out(COHORT_CASES, secret, 2, seed) == {n: set(v) for n, v in COHORT_HELD_OUT.items()}
    assert choose_cohort_secret(COHORT_CASES, COHORT_HELD_OUT, seed) == secret  # reproducible
    # One secret for all the cases together is another constraint: the vertical search does not give it.
    assert choose_secret(sorted(sum(COHORT_CASES.values(), [])), sum(COHORT_HELD_OUT.values(), []), seed) != secret


def test_a_cohort_secret_that_cannot_be_found_or_asked_for_is_an_error():
    with pytest.raises(SplitUNetConfigError, match="hold out fewer"):
        choose_cohort_secret(COHORT_CASES, COHORT_HELD_OUT, 0, max_tries=3)
    with pytest.raises(SplitUNetConfigError, match="cohorts"):
        choose_cohort_secret(COHORT_CASES, {"hospital-1": ["BRATS_002"]}, 0)
    with pytest.raises(SplitUNetConfigError, match="proper subset"):
        choose_cohort_secret(COHORT_CASES, {**COHORT_HELD_OUT, "hospital-3": COHORT_CASES["hospital-3"]}, 0)


def test_a_splitfed_row_gets_a_secret_of_its_own_and_leaves_the_vertical_one(tmp_path):
    data = prepare_compare_data(tmp_path, CompareSettings.quick(topologies=("split_unet_fp32", "splitfed")), 0)
    assert data.cohort_secret and data.cohort_secret != data.secret
    assert (tmp_path / "case_key_secret_splitfed.txt").read_text() == data.cohort_secret
    assert _cohort_held_out(data.cases, data.cohort_secret, 1, 0) == {n: set(v) for n, v in data.held_out.items()}
    plain = prepare_compare_data(tmp_path, CompareSettings.quick(topologies=("split_unet_fp32",)), 0)
    assert plain.secret == data.secret and plain.cohort_secret is None
    assert (tmp_path / "case_key_secret.txt").read_text() == data.secret


# --- what the new rows hand their runners (stubbed) and what they check afterwards


def _compare_data(tmp_path):
    cases = {
        "hospital-1": ["BRATS_001", "BRATS_002", "BRATS_003"],
        "hospital-2": ["BRATS_004", "BRATS_005", "BRATS_006"],
    }
    held_out = {"hospital-1": ["BRATS_002"], "hospital-2": ["BRATS_006"]}
    return CompareData(tmp_path, {name: tmp_path / name for name in cases}, cases, held_out, "vertical", "cohorts")


def _splitfed_stub(tmp_path, calls, recorded_secret="cohorts", val_cases=1):
    def run_splitfed_demo(workspace, settings, job_dir, data_dir, secret_file):
        calls.update(settings=settings, job_dir=job_dir, data_dir=data_dir, secret_file=secret_file)
        held_out = ["BRATS_002", "BRATS_006"]
        record = tmp_path / "server_results.json"
        record.write_text(json.dumps({"val_cases": sorted(case_key(case, recorded_secret) for case in held_out)}))
        sites = group_sites(2)
        return {
            "dice": {"TC": 0.1, "WT": 0.2, "ET": 0.3},
            "hd95": None,
            "iterations": 4,
            "activation_bytes_per_iteration": 500.0,
            "cohorts": [
                {"sites": {s: m for s, (m, g) in sites.items() if g == group}, "train_cases": 2, "val_cases": val_cases}
                for group in (1, 0)
            ],
            "encoder_averaging": {"rounds": 2, "upload_bytes_per_round": 1000},
            "server_results": str(record),
            "elapsed_s": 3.0,
        }

    return run_splitfed_demo


@pytest.mark.parametrize("key", ["splitfed", "splitfed_dwcs", "splitfed_fedprox"])
def test_a_splitfed_row_runs_a_cohort_per_hospital_averaging_once_a_round(tmp_path, monkeypatch, key):
    calls = {}
    monkeypatch.setattr("splitunet.tools.splitfed_demo.run_splitfed_demo", _splitfed_stub(tmp_path, calls))
    settings = CompareSettings.quick(topologies=(key,), fedprox_mu=0.25)
    data = _compare_data(tmp_path)
    figures = _run_splitfed(_BY_KEY[key], tmp_path / key, data, settings, 0)
    demo = calls["settings"]
    assert demo.sites_per_modality == 2 and demo.groups == [data.cases["hospital-1"], data.cases["hospital-2"]]
    args = demo.server_args
    assert args["num_iterations"] == settings.steps and args["num_val_cases"] == settings.val_cases_per_hospital
    assert args["encoder_averaging_every"] == settings.steps // settings.rounds
    assert args["drift_correction"] == ({} if key == "splitfed_dwcs" else None)
    assert args["fedprox_mu"] == (0.25 if key == "splitfed_fedprox" else 0.0)
    assert calls["job_dir"].name == "split_unet_splitfed" and calls["data_dir"] == tmp_path
    assert calls["secret_file"].name == "case_key_secret_splitfed.txt"
    # One cohort's activations every iteration, every site's encoder once a round.
    assert figures["upload_bytes_per_iteration"] == 500.0 + 1000 * 2 / 4
    assert figures["rounds"] == 2 and figures["held_out"] == ["BRATS_002", "BRATS_006"]


@pytest.mark.parametrize("stub", [{"recorded_secret": "vertical"}, {"val_cases": 2}])
def test_a_splitfed_run_that_held_out_other_cases_stops_the_study(tmp_path, monkeypatch, stub):
    monkeypatch.setattr("splitunet.tools.splitfed_demo.run_splitfed_demo", _splitfed_stub(tmp_path, {}, **stub))
    with pytest.raises(SplitUNetConfigError, match="splitfed: "):
        _run_splitfed(_BY_KEY["splitfed"], tmp_path / "run", _compare_data(tmp_path), CompareSettings.quick(), 0)


def _fedavg_stub(seen, rounds):
    def run_fedavg_demo(workspace, settings, job_dir, data_dir):
        seen["server"] = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
        hospitals = {name: {"val_cases": 1} for name in ("hospital-1", "hospital-2")}
        dice = {"TC": 0.1, "WT": 0.2, "ET": 0.3}
        return {"dice": dice, "iterations": 2 * rounds, "rounds": rounds, "hospitals": hospitals}

    return run_fedavg_demo


def test_the_fedavg_dwcs_row_runs_its_drift_corrected_job_sized_to_the_budget(tmp_path, monkeypatch):
    seen = {}
    settings = CompareSettings.quick(topologies=("fedavg_dwcs",))
    monkeypatch.setattr("splitunet.horizontal.demo.run_fedavg_demo", _fedavg_stub(seen, settings.rounds))
    figures = _run_fedavg(_BY_KEY["fedavg_dwcs"], tmp_path / "run", _compare_data(tmp_path), settings, 0)
    assert figures["rounds"] == settings.rounds
    training, evaluation = seen["server"]["workflows"]
    assert training["path"] == "splitunet.horizontal.DriftCorrectedFedAvg"
    assert training["args"]["num_rounds"] == settings.rounds and training["args"]["drift_correction"] == {}
    assert training["args"]["fedprox_mu"] == 0.0 and "num_rounds" not in evaluation["args"]


def test_a_fedavg_run_left_at_the_jobs_own_rounds_stops_the_study(tmp_path, monkeypatch):
    monkeypatch.setattr("splitunet.horizontal.demo.run_fedavg_demo", _fedavg_stub({}, rounds=20))
    with pytest.raises(SplitUNetConfigError, match="fedavg_dwcs: ran 20 rounds, 40 steps instead of 2, 4"):
        _run_fedavg(_BY_KEY["fedavg_dwcs"], tmp_path / "run", _compare_data(tmp_path), CompareSettings.quick(), 0)


# --- the DP rows: each runs its DP job at the row's target epsilon and reports the worst holder's epsilon


def _fedavg_dp_stub(seen, rounds, epsilons):
    def run_fedavg_demo(workspace, settings, job_dir, data_dir):
        seen["client"] = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
        seen["server"] = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
        hospitals = {name: {"val_cases": 1} for name in ("hospital-1", "hospital-2")}
        dp = {
            name: {"epsilon": eps, "delta": 1e-5, "projected_epsilon": eps, "steps": 4}
            for name, eps in epsilons.items()
        }
        return {
            "dice": {"TC": 0.1, "WT": 0.2, "ET": 0.3},
            "iterations": 2 * rounds,
            "rounds": rounds,
            "hospitals": hospitals,
            "dp": dp,
        }

    return run_fedavg_demo


def test_a_fedavg_dp_row_runs_the_dp_job_at_its_target_epsilon_and_reports_the_worst_hospital(tmp_path, monkeypatch):
    seen = {}
    settings = CompareSettings.quick(topologies=("fedavg_dp_eps3",))
    stub = _fedavg_dp_stub(seen, settings.rounds, {"hospital-1": 2.91, "hospital-2": 2.97})
    monkeypatch.setattr("splitunet.horizontal.demo.run_fedavg_demo", stub)
    figures = _run_fedavg(_BY_KEY["fedavg_dp_eps3"], tmp_path / "run", _compare_data(tmp_path), settings, 0)
    shipped = resolve_jobs()["fedavg_unet_dp"].executor_args["dp"]
    assert seen["client"]["executors"][0]["executor"]["args"]["dp"] == {**shipped, "target_epsilon": 3.0}
    assert seen["server"]["workflows"][0]["args"]["num_rounds"] == settings.rounds
    assert figures["epsilon"] == 2.97 and figures["delta"] == 1e-5
    assert figures["dp"] == {
        "hospital-1": {"epsilon": 2.91, "delta": 1e-5},
        "hospital-2": {"epsilon": 2.97, "delta": 1e-5},
    }


def test_a_dp_row_whose_holder_reported_no_epsilon_stops_the_study(tmp_path, monkeypatch):
    settings = CompareSettings.quick(topologies=("fedavg_dp_eps1",))
    monkeypatch.setattr(
        "splitunet.horizontal.demo.run_fedavg_demo", _fedavg_dp_stub({}, settings.rounds, {"hospital-1": 0.9})
    )
    with pytest.raises(SplitUNetConfigError, match="fedavg_dp_eps1: not every data holder reported its epsilon"):
        _run_fedavg(_BY_KEY["fedavg_dp_eps1"], tmp_path / "run", _compare_data(tmp_path), settings, 0)


def test_the_split_dp_row_budgets_every_site_for_the_studys_steps(tmp_path, monkeypatch):
    calls = {}
    data = _compare_data(tmp_path)
    record = tmp_path / "server_results.json"
    record.write_text(json.dumps({"val_cases": data.held_out_keys()}))

    def run_demo(workspace, settings, job_dir, data_dir):
        calls.update(settings=settings, job_dir=job_dir)
        for index, site in enumerate(("site-1", "site-2")):
            own = workspace / "simulator" / site / "simulate_job" / "results.json"
            own.parent.mkdir(parents=True)
            own.write_text(json.dumps({"party": site, "dp": {"epsilon": 2.5 + index / 10, "delta": 1e-5}}))
        return {
            "dice": {"TC": 0.1, "WT": 0.2, "ET": 0.3},
            "iterations": 4,
            "sites": {"site-1": "flair", "site-2": "t1"},
            "server_results": str(record),
        }

    monkeypatch.setattr("splitunet.tools.demo.run_demo", run_demo)
    settings = CompareSettings.quick(topologies=("split_unet_dp_eps3",))
    figures = _run_vertical(_BY_KEY["split_unet_dp_eps3"], tmp_path / "run", data, settings, 0)
    shipped = resolve_jobs()["split_unet_dp"].executor_args["dp"]
    assert calls["job_dir"].name == "split_unet_dp"
    assert calls["settings"].client_args == {"dp": {**shipped, "target_epsilon": 3.0}, "dp_steps": settings.steps}
    assert figures["epsilon"] == pytest.approx(2.6) and set(figures["dp"]) == {"site-1", "site-2"}


def test_the_epsilon_column_is_the_worst_holder_and_seed_and_a_dash_without_dp():
    settings = CompareSettings.quick(topologies=("split_unet_fp32", "fedavg_dp_eps1"), seeds=(0, 1))
    runs = {
        "split_unet_fp32": {0: _run(0.5, 0.5, 0.5), 1: _run(0.5, 0.5, 0.5)},
        "fedavg_dp_eps1": {
            0: {**_run(0.3, 0.3, 0.3, rounds=2), "epsilon": 0.93, "delta": 1e-5},
            1: {**_run(0.3, 0.3, 0.3, rounds=2), "epsilon": 0.98, "delta": 1e-5},
        },
    }
    report = summarise_compare(settings, runs)
    reference, private = report["rows"]
    assert reference["epsilon"] is None and reference["target_epsilon"] is None
    assert (private["epsilon"], private["delta"], private["target_epsilon"]) == (0.98, 1e-5, 1.0)
    text = compare_markdown(report)
    header, _, *rows = [line for line in text.splitlines() if line.startswith("|")]
    assert header.rstrip(" |").endswith("s / iteration | ε (δ)")
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    assert cells[0][-1] == "-" and cells[1][-1] == "0.98 (1e-05)"
    assert "min(1e-5, 1/(10 N))" in text
    assert "ε (δ): the epsilon" not in compare_markdown(summarise_compare(CompareSettings.quick(topologies=KEYS), {}))


# --- a study under way keeps its finished runs when the settings gain a field

# What compare_run.json held as "settings" for CompareSettings.quick() before any field was added: a study's files.
# Runs of that time trained under Adam's coupled weight decay and recorded no optimiser.
FIRST_QUICK_FINGERPRINT = {
    "hospitals": 2,
    "cases_per_hospital": 3,
    "val_cases_per_hospital": 1,
    "shape": [32, 32, 32],
    "steps": 4,
    "rounds": 2,
    "batch_size": 1,
    "crop_size": [32, 32, 32],
    "features": [4, 8, 8, 16, 16, 4],
    "learning_rate": 0.002,
    "fedprox_mu": 0.01,
}
ADAMW_QUICK_FINGERPRINT = {**FIRST_QUICK_FINGERPRINT, "optimizer": "AdamW"}


@pytest.mark.parametrize("key", ["split_unet_fp32", "splitfed", "fedprox", "u_shape_dwcs", "centralized"])
def test_a_run_finished_under_the_same_settings_is_reused_unless_adam_trained_it(tmp_path, key):
    run_dir = tmp_path / "seed0" / key
    run_dir.mkdir(parents=True)
    run = {"settings": ADAMW_QUICK_FINGERPRINT, "seed": 0, "topology": key, **_run(0.1, 0.2, 0.3)}
    (run_dir / "compare_run.json").write_text(json.dumps(run))
    assert _finished(run_dir, CompareSettings.quick(), _BY_KEY[key]) == run
    assert _finished(run_dir, CompareSettings.quick(fedprox_mu=0.1), _BY_KEY[key]) is None
    (run_dir / "compare_run.json").write_text(json.dumps({**run, "settings": FIRST_QUICK_FINGERPRINT}))
    assert _finished(run_dir, CompareSettings.quick(), _BY_KEY[key]) is None


def test_a_field_added_later_enters_the_fingerprint_only_away_from_its_default():
    @dataclasses.dataclass
    class Later(CompareSettings):
        new_option: float = 0.5
        new_sizes: tuple = dataclasses.field(default_factory=lambda: (1, 2))

    assert Later.quick().fingerprint() == CompareSettings.quick().fingerprint() == ADAMW_QUICK_FINGERPRINT
    assert Later.quick(new_option=0.7).fingerprint() == {**ADAMW_QUICK_FINGERPRINT, "new_option": 0.7}
    assert Later.quick(new_sizes=(3,)).fingerprint() == {**ADAMW_QUICK_FINGERPRINT, "new_sizes": [3]}


def test_a_dp_run_is_reused_only_under_the_dp_settings_it_ran_with(tmp_path):
    settings = CompareSettings.quick()
    topology = _BY_KEY["fedavg_dp_eps10"]
    run_dir = tmp_path / "seed0" / topology.key
    run_dir.mkdir(parents=True)
    dp = {**resolve_jobs()["fedavg_unet_dp"].executor_args["dp"], "target_epsilon": 10.0}
    run = {"settings": settings.fingerprint(), "row_settings": {"dp": dp}, **_run(0.1, 0.2, 0.3)}
    (run_dir / "compare_run.json").write_text(json.dumps(run))
    assert _finished(run_dir, settings, topology) == run
    (run_dir / "compare_run.json").write_text(json.dumps({**run, "row_settings": {"dp": {**dp, "max_grad_norm": 1}}}))
    assert _finished(run_dir, settings, topology) is None
    (run_dir / "compare_run.json").write_text(json.dumps({key: v for key, v in run.items() if key != "row_settings"}))
    assert _finished(run_dir, settings, topology) is None


def test_parts_of_a_study_run_elsewhere_merge_and_only_the_missing_runs_train(tmp_path, monkeypatch):
    from splitunet.evaluation import compare

    settings = CompareSettings.quick(seeds=(0, 1), topologies=("fedavg", "fedavg_dp_eps10"))
    held_out = {"hospital-1": ["BRATS_002"], "hospital-2": ["BRATS_005"]}
    data = CompareData(tmp_path, {}, {}, held_out, "vertical", None)
    monkeypatch.setattr(compare, "prepare_compare_data", lambda folder, settings, seed: data)
    trained = []

    def fake_runner(topology, run_dir, data, settings, seed):
        trained.append((topology.key, seed))
        return _run(0.1, 0.1, 0.1)

    monkeypatch.setitem(compare._RUNNERS, "fedavg", fake_runner)

    def part(name, key, seed, dice):
        topology = _BY_KEY[key]
        record = {"settings": settings.fingerprint(), "seed": seed, "topology": key, **_run(dice, dice, dice)}
        row = compare._row_fingerprint(topology, settings)
        if row:
            record["row_settings"] = row
        path = tmp_path / name
        path.write_text(json.dumps({"held_out": {str(seed): held_out}, "runs": {key: {str(seed): record}}}))
        return path

    here = part("here.json", "fedavg", 0, 0.8)
    elsewhere = part("elsewhere.json", "fedavg_dp_eps10", 1, 0.2)
    also_here = part("also_here.json", "fedavg", 0, 0.5)  # the same run again: the first file gives it
    report = compare.run_compare(tmp_path / "merged", settings, reuse=[here, elsewhere, also_here])

    assert sorted(trained) == [("fedavg", 1), ("fedavg_dp_eps10", 0)]
    rows = {row["key"]: row for row in report["rows"]}
    assert rows["fedavg"]["dice_by_seed"]["0"]["TC"] == 0.8
    assert rows["fedavg_dp_eps10"]["dice_by_seed"]["1"]["TC"] == 0.2
    assert rows["fedavg_dp_eps10"]["seeds"] == [0, 1]

    with pytest.raises(SplitUNetConfigError, match="missing.json"):
        compare.run_compare(tmp_path / "again", settings, reuse=tmp_path / "missing.json")


# --- learning curves (curve_every): what each runner is asked to score and how its scores become one curve


def _dice_at(mean):
    return {"TC": mean, "WT": mean, "ET": mean, "mean": mean}


def test_a_fedavg_curve_pools_the_hospitals_scores_of_each_round_and_the_final_model(tmp_path, monkeypatch):
    seen = {}
    settings = CompareSettings.quick(steps=6, rounds=3, curve_every=2)

    def run_fedavg_demo(workspace, demo, job_dir, data_dir):
        seen["client"] = demo.client_args
        # Round r's global model is scored when round r starts (after r rounds); the last one at the end.
        history = lambda shift: [  # noqa: E731
            {"round": r, "iterations": 2 * r, "dice": _dice_at(0.1 * r + shift)} for r in (1, 2)
        ]
        hospitals = {
            "hospital-1": {"val_cases": 1, "history": history(0.0), "dice": _dice_at(0.5)},
            "hospital-2": {"val_cases": 1, "history": history(0.2), "dice": _dice_at(0.7)},
        }
        return {"dice": _dice_at(0.6), "iterations": 6, "rounds": 3, "hospitals": hospitals}

    monkeypatch.setattr("splitunet.horizontal.demo.run_fedavg_demo", run_fedavg_demo)
    figures = _run_fedavg(_BY_KEY["fedavg"], tmp_path / "run", _compare_data(tmp_path), settings, 0)
    assert seen["client"]["val_every"] == 1  # in rounds of 2 steps
    assert [point["iteration"] for point in figures["curve"]] == [2, 4, 6]
    assert [point["dice"]["WT"] for point in figures["curve"]] == pytest.approx([0.2, 0.3, 0.6])


def test_a_u_shape_curve_pools_each_validation_and_a_gap_in_it_stops_the_study(tmp_path, monkeypatch):
    seen = {}
    settings = CompareSettings.quick(curve_every=2)

    def run_u_shape_demo(workspace, demo, data_dir, job_dir, history=((2, 0.2), (4, 0.4))):
        seen["server"] = demo.server_args
        hospitals = {name: {"val_cases": 1} for name in ("hospital-1", "hospital-2")}
        entries = [
            {"iteration": t, "dice": {"hospital-1": _dice_at(v), "hospital-2": _dice_at(v + 0.2)}} for t, v in history
        ]
        return {"dice": _dice_at(0.5), "iterations": 4, "rounds": 2, "hospitals": hospitals, "history": entries}

    monkeypatch.setattr("splitunet.u_shape.demo.run_u_shape_demo", run_u_shape_demo)
    figures = _run_u_shape(_BY_KEY["u_shape"], tmp_path / "run", _compare_data(tmp_path), settings, 0)
    assert seen["server"]["val_every"] == 1
    assert [point["dice"]["ET"] for point in figures["curve"]] == pytest.approx([0.3, 0.5])

    gap = lambda *args, **kwargs: run_u_shape_demo(*args, **kwargs, history=((4, 0.4),))  # noqa: E731
    monkeypatch.setattr("splitunet.u_shape.demo.run_u_shape_demo", gap)
    with pytest.raises(SplitUNetConfigError, match="u_shape: scored at steps \\[4\\], not at \\[2, 4\\]"):
        _run_u_shape(_BY_KEY["u_shape"], tmp_path / "run", _compare_data(tmp_path), settings, 0)


def _curve_report(settings, means_by_key):
    """A report whose runs scored at settings.curve_steps; seed s of a row at step t: ``means[s] * t / steps``."""
    runs = {
        key: {
            seed: {
                **_run(*[m] * 3, iterations=settings.steps),
                "curve": [
                    {"iteration": t, "dice": {r: m * t / settings.steps for r in ("TC", "WT", "ET")}}
                    for t in settings.curve_steps
                ],
            }
            for seed, m in enumerate(means)
        }
        for key, means in means_by_key.items()
    }
    return summarise_compare(settings, runs, {seed: {"hospital-1": ["a"]} for seed in settings.seeds})


def test_the_curve_table_and_the_half_budget_verdict_only_for_a_study_with_curves():
    settings = CompareSettings.quick(steps=8, rounds=4, curve_every=2, seeds=(0, 1, 2), topologies=KEYS[:2])
    report = _curve_report(settings, {"split_unet_fp32": [0.8, 0.82, 0.84], "fedavg": [0.6, 0.7, 0.8]})
    text = curve_markdown(report)
    assert "| topology | 2 | 4 | 6 | 8 |" in text
    # fedavg at step 4: half of each seed's final mean, mean over seeds.
    assert f"| {_BY_KEY['fedavg'].label} | 0.175 | 0.350 | 0.525 | 0.700 |" in text
    # From step 4 to 8 every row doubled: still rising.
    assert "its own step 4" in text and "still rising" in text
    # Steps 4, 6, 8 make a window: fedavg's level is the mean of t/8 over them (0.75 of its end), rising 50 %.
    assert "from step 4 on" in text and "steps 4, 6, 8" in text
    assert f"| {_BY_KEY['fedavg'].label} | 0, 1, 2 | 0.525 [" in text and "| +35.0 [" in text
    assert text in compare_markdown(report)
    bare = CompareSettings.quick(seeds=(0, 1, 2), topologies=KEYS[:2])
    assert curve_markdown(_curve_report(bare, {"split_unet_fp32": [0.8] * 3})) == ""


def test_a_dp_row_of_a_curve_study_is_named_as_not_read_under_both_readings():
    keys = ("split_unet_fp32", "fedavg_dp_eps3")
    settings = CompareSettings.quick(steps=8, rounds=4, curve_every=2, seeds=(0, 1, 2), topologies=keys)
    text = curve_markdown(_curve_report(settings, {"split_unet_fp32": [0.8, 0.82, 0.84], "fedavg_dp_eps3": [0.5] * 3}))
    label = next(t.label for t in TOPOLOGIES if t.key == "fedavg_dp_eps3")
    # Under the half-budget table and under the window's.
    assert text.count(f"Not read: {label} (DP-SGD: its noise was set for the whole budget") == 2
