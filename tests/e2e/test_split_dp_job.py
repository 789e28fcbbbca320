"""End to end: the main job with DP-SGD at every site (``split_unet_dp``, as shipped but for its length) in the FLARE
simulator on a tiny phantom: it finishes, and each site reports in its own results.json the epsilon it spent at
every save, ending at the projection it admitted the job with, at or below the job's target."""

from __future__ import annotations

import json

import pytest
from tiny_job import tiny_server_args

from splitunet.dp import DPSettings, plan_split_budget
from splitunet.tools.demo import DemoSettings, run_demo
from splitunet.tools.deployment import find_job
from splitunet.tools.simulator import find_run_file

pytestmark = pytest.mark.e2e

JOB = "split_unet_dp"
ITERATIONS, VAL_EVERY, CASES = 4, 2, 4
SITES = ("site-1", "site-2", "site-3", "site-4")


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("split_dp")
    settings = DemoSettings(
        cases=CASES,
        shape=(40, 40, 40),
        seed=3,
        server_args=tiny_server_args(num_iterations=ITERATIONS, val_every=VAL_EVERY, num_val_cases=1),
        # The job's step budget follows its length: a site refuses any step beyond it.
        client_args={"dp_steps": ITERATIONS},
        timeout_s=300,
    )
    return workspace, run_demo(workspace, settings, job_dir=find_job(JOB))


def test_every_site_reports_the_epsilon_it_spent_at_each_save(dp_run):
    workspace, summary = dp_run
    assert summary["job"] == JOB and summary["iterations"] == ITERATIONS
    shipped = json.loads((workspace / "job" / JOB / "app/config/config_fed_client.json").read_text())
    dp = DPSettings(**shipped["executors"][0]["executor"]["args"]["dp"])
    # What each site projects before its first step, computed here independently of the run: every site holds all
    # the phantom's cases, the budget is the run's iterations, and there is no subsampling.
    expected = plan_split_budget(dp, num_cases=CASES, steps=ITERATIONS)
    for site in SITES:
        own = json.loads(find_run_file(workspace / "simulator", site, "results.json").read_text())
        record = own["dp"]
        assert own["party"] == site and own["steps_applied"] == ITERATIONS
        assert record["budget"]["sample_rate"] == 1.0 and record["budget"]["steps"] == ITERATIONS
        assert record["budget"]["epsilon"] == pytest.approx(expected.epsilon, rel=1e-9)
        assert record["delta"] == expected.delta and record["steps"] == ITERATIONS
        # Every step was taken: the epsilon spent is the projection, at or below the job's target.
        assert record["epsilon"] == pytest.approx(expected.epsilon, rel=1e-9)
        assert 0 < record["epsilon"] <= dp.target_epsilon
        per_save = record["epsilon_per_round"]
        assert [(entry["iteration"], entry["steps"]) for entry in per_save] == [(2, 2), (4, 4)]
        assert 0 < per_save[0]["epsilon"] < per_save[1]["epsilon"] == record["epsilon"]
        assert record["model_changes"]["replaced"] == []
