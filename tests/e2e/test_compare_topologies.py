"""End to end: ``run_compare`` in its quick configuration, one seed, the cheap topologies (vertical float32, FedAvg,
U-shape, each a FLARE simulator run; the centralized baseline in process) on the same two phantom hospitals'
patients, scored after each round on the way; a second call reuses them; a study of half the budget is what the
first one's curves say it is."""

from __future__ import annotations

import json

import pytest

from splitunet.evaluation.budget_change import budget_at
from splitunet.evaluation.compare import CompareSettings, run_compare

pytestmark = pytest.mark.e2e

TOPOLOGIES = ("split_unet_fp32", "fedavg", "u_shape", "centralized")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    settings = CompareSettings.quick(seeds=(0,), topologies=TOPOLOGIES, curve_every=2)
    return out, settings, run_compare(out, settings)


def test_every_topology_is_scored_on_the_same_held_out_patients(study):
    out, settings, report = study
    assert [row["key"] for row in report["rows"]] == list(TOPOLOGIES)
    held_out = report["held_out"]["0"]
    assert set(held_out) == {"hospital-1", "hospital-2"} and all(len(cases) == 1 for cases in held_out.values())
    expected = sorted(case for cases in held_out.values() for case in cases)
    for key in TOPOLOGIES:
        run = json.loads((out / "seed0" / key / "compare_run.json").read_text())
        assert run["held_out"] == expected
        assert run["iterations"] == settings.steps
    # The vertical job's source is the union of the hospitals' cases, nothing else.
    source = json.loads((out / "data_seed0" / "phantom_msd" / "dataset.json").read_text())
    assert source["numTraining"] == 2 * settings.cases_per_hospital
    vertical = json.loads((out / "seed0" / "split_unet_fp32" / "results.json").read_text())
    assert json.loads(open(vertical["server_results"]).read())["num_val_cases"] == 2


def test_the_table_reports_dice_bytes_seconds_and_rounds(study):
    out, settings, report = study
    rows = {row["key"]: row for row in report["rows"]}
    for key, row in rows.items():
        assert all(0.0 <= row["dice_mean"][region] <= 1.0 for region in ("TC", "WT", "ET"))
        # HD95 in voxels: at most the 32^3 phantom's diagonal, the score of a region missed entirely.
        assert all(0.0 <= row["hd95_mean"][region] <= 32 * 3**0.5 + 1e-6 for region in ("TC", "WT", "ET")), key
        assert row["seconds_per_iteration"] > 0
        # Nothing leaves the centralized baseline's one process.
        assert (row["upload_bytes_per_iteration"] is None) == (key == "centralized")
        assert key == "centralized" or row["upload_bytes_per_iteration"] > 0
    assert rows["split_unet_fp32"]["rounds"] is None and rows["centralized"]["rounds"] is None
    assert rows["fedavg"]["rounds"] == rows["u_shape"]["rounds"] == settings.rounds
    # The reference's difference to itself is zero; one seed gives no interval.
    assert rows["split_unet_fp32"]["difference_to_reference"]["mean"]["mean"] == 0.0
    markdown = (out / "compare.md").read_text()
    # The first table: a header and a row per topology (the learning curves follow below it).
    table = markdown.split("\n\n")[1]
    assert table.count("\n| ") + table.startswith("| ") == 1 + len(TOPOLOGIES)
    assert "horizontal FedAvg" in markdown and "U-shape" in markdown


def test_a_second_call_reuses_the_finished_runs(study):
    out, settings, report = study
    before = {key: (out / "seed0" / key / "results.json").stat().st_mtime_ns for key in TOPOLOGIES}
    again = run_compare(out, settings)
    assert again["rows"] == report["rows"]
    assert {key: (out / "seed0" / key / "results.json").stat().st_mtime_ns for key in TOPOLOGIES} == before


def test_another_folder_continues_from_the_summary_alone(study, tmp_path):
    out, settings, report = study
    # A new machine: only compare.json travels; the data, held-out cases and secrets come again from the seed.
    again = run_compare(tmp_path / "elsewhere", settings, reuse=out / "compare.json")
    assert again["rows"] == report["rows"]
    assert not any((tmp_path / "elsewhere" / "seed0").glob("*/results.json"))  # nothing trained

    # Runs of other settings are not taken over: that row trains again.
    other = json.loads((out / "compare.json").read_text())
    other["runs"]["centralized"]["0"]["settings"] = {**other["runs"]["centralized"]["0"]["settings"], "steps": 999}
    (tmp_path / "other.json").write_text(json.dumps(other))
    rerun = run_compare(
        tmp_path / "rerun",
        CompareSettings.quick(seeds=(0,), topologies=("centralized",)),
        reuse=tmp_path / "other.json",
    )
    assert rerun["runs"]["centralized"]["0"]["settings"]["steps"] == settings.steps


def test_every_run_is_scored_after_each_round_and_its_curve_ends_at_its_figures(study):
    out, settings, report = study
    for key in TOPOLOGIES:
        curve = report["runs"][key]["0"]["curve"]
        assert [point["iteration"] for point in curve] == [2, 4], key
        assert curve[-1]["dice"] == pytest.approx({r: report["runs"][key]["0"]["dice"][r] for r in ("TC", "WT", "ET")})
    assert "| topology | 2 | 4 |" in (out / "compare.md").read_text()


def test_the_curve_at_half_the_budget_is_the_half_budget_study(study, tmp_path):
    out, settings, report = study
    # The topologies whose runs are seeded throughout (the vertical sites draw private encoder seeds: their runs
    # differ in initialisation from run to run, so only the curve's form is checked above).
    seeded = ("fedavg", "u_shape", "centralized")
    half = run_compare(tmp_path / "half", CompareSettings.quick(seeds=(0,), topologies=seeded, steps=2, rounds=1))
    read = {row["key"]: row["dice_by_seed"]["0"] for row in budget_at(report, 2)["rows"]}
    for row in half["rows"]:
        # Scoring on the way changed nothing: the first 2 steps of the 4-step runs are the 2-step runs.
        expected = {region: row["dice_by_seed"]["0"][region] for region in ("TC", "WT", "ET")}
        assert read[row["key"]] == pytest.approx(expected, abs=1e-6), row["key"]
