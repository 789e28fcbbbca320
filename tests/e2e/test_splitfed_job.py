"""The SplitFed job (``split_unet_splitfed``) in the FLARE simulator: two sites per modality, eight in all.

Eight phantom patients (40^3) are dealt to two groups; ``site-1`` .. ``site-4`` hold one modality each of the first
group's patients, ``site-5`` .. ``site-8`` of the second's, and the label holder every label. Six iterations with the
encoders of each modality's two sites averaged after iterations 3 and 6, then validation: the training run of
``splitunet leakage-splitfed --quick``, shared with that command's test. After the run:

- the two sites of each modality end with the same encoder (the last average was the last thing they took) and had
  drifted apart before each average;
- each site took exactly the steps of its own cohort (a site asked to encode another cohort's case fails the run);
- ``results.json`` records the cohorts by counts, never by case key or case ID.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitunet.checkpoint import load_checkpoint
from splitunet.data.case_keys import case_key
from splitunet.data.nifti_io import nifti_case_id
from splitunet.evaluation.leakage.splitfed_leakage import SplitFedLeakageSettings

pytestmark = pytest.mark.e2e

QUICK = SplitFedLeakageSettings.quick()
ITERATIONS, EVERY = QUICK.num_iterations, QUICK.every
assert (ITERATIONS, EVERY, QUICK.cases, QUICK.sites_per_modality) == (6, 3, 8, 2)  # what the checks below assume
GROUP_OF = {f"site-{i}": (i - 1) // 4 for i in range(1, 9)}
PAIRS = [("site-1", "site-5"), ("site-2", "site-6"), ("site-3", "site-7"), ("site-4", "site-8")]


@pytest.fixture(scope="module")
def run(splitfed_quick_leakage):
    # The training run of `splitunet leakage-splitfed --quick` (tests/conftest.py): the job as shipped, but for sizes,
    # with the server's capture filter on; a run of its own would cost another minute of FLARE start-up.
    workspace = splitfed_quick_leakage / "run"
    summary = json.loads((workspace / "results.json").read_text())
    results = json.loads(Path(summary["server_results"]).read_text())
    encoders = {
        site: load_checkpoint(next((workspace / "checkpoints" / site).glob("**/encoder_*_last.pt")))
        for site in GROUP_OF
    }
    return workspace, results, encoders


def test_the_sites_of_a_modality_end_with_the_same_encoder_after_averaging(run):
    _, results, encoders = run
    assert results["status"] == "completed" and results["iterations"] == ITERATIONS
    averaging = results["encoder_averaging"]
    assert averaging["rounds"] == 2 and [entry["iteration"] for entry in averaging["history"]] == [3, 6]
    for first, second in PAIRS:
        assert encoders[first]["modality"] == encoders[second]["modality"]
        ours, theirs = encoders[first]["encoder"], encoders[second]["encoder"]
        assert all(torch.equal(ours[name], theirs[name]) for name in ours), (first, second)
        assert encoders[first]["averages_loaded"] == encoders[second]["averages_loaded"] == 2
        # Before each average they had trained apart: the average moved both.
        assert all(entry["distance_to_average"][first] > 0 for entry in averaging["history"])
    # Weighted by training cases, which the server counted per site.
    groups = averaging["groups"]
    assert set(groups) == {"flair", "t1", "t1gd", "t2"}
    cohort_cases = {site: c["train_cases"] for c in results["cohorts"] for site in c["sites"]}
    assert all(weight == cohort_cases[site] for weights in groups.values() for site, weight in weights.items())
    # One decoder input per modality, whatever the number of sites.
    decoder = load_checkpoint(Path(results["checkpoints"]["server"]["last"]))
    assert decoder["num_sites"] == 4 and decoder["decoder_modalities"] == ["flair", "t1", "t1gd", "t2"]


def test_each_site_computed_only_its_own_cohorts_steps(run):
    workspace, results, encoders = run
    cohorts = results["cohorts"]
    assert [sorted(c["sites"]) for c in cohorts] == [
        [f"site-{i}" for i in range(1, 5)],
        [f"site-{i}" for i in range(5, 9)],
    ]
    assert sum(c["steps"] for c in cohorts) == ITERATIONS and all(c["steps"] > 0 for c in cohorts)
    for index, cohort in enumerate(cohorts):
        for site in cohort["sites"]:
            assert GROUP_OF[site] == index
            # Every gradient it took was for features it computed in one of its cohort's steps.
            assert encoders[site]["steps_applied"] == cohort["steps"], site
            folder = workspace / "data" / "groups" / f"group-{index + 1}" / cohort["sites"][site]
            held = [path for path in folder.iterdir() if nifti_case_id(path)]
            assert cohort["train_cases"] + cohort["val_cases"] == len(held)
    assert results["num_train_cases"] == sum(c["train_cases"] for c in cohorts)


def test_results_record_cohorts_by_counts_never_by_case(run):
    workspace, results, _ = run
    assert results["left_out_cases"] == {}
    secret = (workspace / "data" / "case_key_secret.txt").read_text().strip()
    case_ids = sorted(
        filter(None, (nifti_case_id(path) for path in (workspace / "data" / "parties" / "labels").iterdir()))
    )
    assert len(case_ids) == 8
    keys = [case_key(case_id, secret) for case_id in case_ids]
    assert set(results["val_cases"]) <= set(keys)  # the check below can see a key where there is one
    recorded = json.dumps({"cohorts": results["cohorts"], "encoder_averaging": results["encoder_averaging"]})
    assert not [text for text in (*keys, *case_ids) if text in recorded]
    for cohort in results["cohorts"]:
        assert set(cohort) == {"sites", "train_cases", "val_cases", "steps"}
        assert cohort["val_cases"] == 1 and cohort["train_cases"] == 3
