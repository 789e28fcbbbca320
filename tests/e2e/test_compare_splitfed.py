"""End to end: the ``splitfed`` row of ``run_compare`` in its quick configuration, one seed: the SplitFed job in the
FLARE simulator with each of the two phantom hospitals as one cohort of four sites (eight sites), held out exactly as
the other topologies hold out (checked by the runner, and here against the SplitFed secret's keys), and scored after
each averaging round."""

from __future__ import annotations

import json

import pytest

from splitunet.data.case_keys import case_key
from splitunet.data.nifti_io import nifti_case_id
from splitunet.evaluation.compare import CompareSettings, run_compare

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_splitfed")
    settings = CompareSettings.quick(seeds=(0,), topologies=("splitfed",), curve_every=2)
    return out, settings, run_compare(out, settings)


def test_each_hospital_is_one_cohort_that_holds_out_that_hospitals_cases(study):
    out, settings, report = study
    held_out = report["held_out"]["0"]
    data = out / "data_seed0"
    for index, name in enumerate(settings.hospital_names):
        hospital = json.loads((data / name / "dataset.json").read_text())
        cases = sorted(nifti_case_id(data / name / entry["image"]) for entry in hospital["training"])
        group = data / "groups" / f"group-{index + 1}" / "t1gd"
        assert sorted(filter(None, map(nifti_case_id, group.iterdir()))) == cases
    secret = (data / "case_key_secret_splitfed.txt").read_text().strip()
    assert secret != (data / "case_key_secret.txt").read_text().strip()  # the vertical rows' secret is its own
    summary = json.loads((out / "seed0" / "splitfed" / "results.json").read_text())
    recorded = json.loads(open(summary["server_results"]).read())["val_cases"]
    assert sorted(recorded) == sorted(case_key(case, secret) for cases in held_out.values() for case in cases)
    train = settings.cases_per_hospital - settings.val_cases_per_hospital
    assert [(cohort["train_cases"], cohort["val_cases"]) for cohort in summary["cohorts"]] == [(train, 1), (train, 1)]
    # Scored after each averaging round on the way; the curve ends at the run's figures.
    curve = report["runs"]["splitfed"]["0"]["curve"]
    assert [point["iteration"] for point in curve] == [2, 4]
    assert curve[-1]["dice"] == pytest.approx({region: summary["dice"][region] for region in ("TC", "WT", "ET")})
    run = json.loads((out / "seed0" / "splitfed" / "compare_run.json").read_text())
    assert run["held_out"] == sorted(case for cases in held_out.values() for case in cases)


def test_the_row_averages_once_a_round_and_counts_the_encoders_in_its_upload(study):
    out, settings, report = study
    [row] = report["rows"]
    assert row["rounds"] == settings.rounds and row["iterations"] == [settings.steps]
    summary = json.loads((out / "seed0" / "splitfed" / "results.json").read_text())
    averaging = summary["encoder_averaging"]
    assert averaging["every"] == settings.local_steps and averaging["drift_correction"] is None
    assert [entry["iteration"] for entry in averaging["history"]] == [settings.local_steps, settings.steps]
    weights = averaging["upload_bytes_per_round"] * settings.rounds / settings.steps
    assert row["upload_bytes_per_iteration"] == pytest.approx(summary["activation_bytes_per_iteration"] + weights)
    assert all(0.0 <= row["dice_mean"][region] <= 1.0 for region in ("TC", "WT", "ET"))
    assert row["hd95_mean"]["WT"] is not None
