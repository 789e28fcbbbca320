"""End to end: the FedAvg job with DP-SGD at every hospital (``fedavg_unet_dp``, as shipped) in the FLARE simulator,
two tiny phantom hospitals: it finishes, and each hospital reports the epsilon it spent, at its delta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitunet.dp import DPSettings, plan_budget
from splitunet.horizontal.demo import FEDAVG_DP_JOB_NAME, FedAvgDemoSettings, run_fedavg_demo
from splitunet.tools.deployment import find_job

pytestmark = pytest.mark.e2e

FEATURES = [4, 8, 8, 16, 16, 4]
ROUNDS, LOCAL_ITERATIONS, CASES = 2, 2, 4
HOSPITALS = ("hospital-1", "hospital-2")


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("fedavg_dp")
    settings = FedAvgDemoSettings(
        hospitals=len(HOSPITALS),
        cases=CASES,
        shape=(32, 32, 32),
        seed=3,
        server_args={"num_rounds": ROUNDS},
        client_args={
            "local_iterations": LOCAL_ITERATIONS,
            "crop_size": [32, 32, 32],
            "features": FEATURES,
            "num_val_cases": 1,
        },
        model_args={"features": FEATURES},
        timeout_s=300,
    )
    return workspace, run_fedavg_demo(workspace, settings, job_dir=find_job(FEDAVG_DP_JOB_NAME))


def test_the_dp_job_finishes_and_reports_each_hospitals_epsilon(dp_run):
    workspace, summary = dp_run
    assert summary["job"] == FEDAVG_DP_JOB_NAME and summary["simulator_exit_code"] == 0
    assert sorted(summary["dp"]) == list(HOSPITALS)
    shipped = json.loads((workspace / "job" / FEDAVG_DP_JOB_NAME / "app/config/config_fed_client.json").read_text())
    dp = DPSettings(**shipped["executors"][0]["executor"]["args"]["dp"])
    # What each hospital projected before its first step, computed here independently of the run.
    expected = plan_budget(dp, num_cases=CASES - 1, batch_size=2, steps=ROUNDS * LOCAL_ITERATIONS)
    for name in HOSPITALS:
        reported = summary["dp"][name]
        assert reported["steps"] == ROUNDS * LOCAL_ITERATIONS and reported["delta"] == expected.delta
        # Every step of the job was taken: the epsilon spent is the projection, at or below the job's target.
        assert reported["epsilon"] == pytest.approx(reported["projected_epsilon"], rel=1e-9)
        assert reported["projected_epsilon"] == pytest.approx(expected.epsilon, rel=1e-9)
        assert 0 < reported["epsilon"] <= dp.target_epsilon
        own = json.loads(Path(summary["hospitals"][name]["results"]).read_text())
        per_round = own["dp"]["epsilon_per_round"]
        assert len(per_round) == ROUNDS and 0 < per_round[0] < per_round[1] == reported["epsilon"]
        assert own["dp"]["model_changes"]["replaced"] == []
        assert all(0.0 <= own["dice"][region] <= 1.0 for region in ("TC", "WT", "ET"))


def test_each_hospitals_epsilon_per_round_reaches_the_servers_tensorboard(dp_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workspace, summary = dp_run
    recorded = {}
    for events in workspace.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "dp_epsilon" in accumulator.Tags().get("scalars", []):
            # FLARE's receiver writes each site's analytics under a folder named after it.
            recorded[events.parent.name] = [(e.step, e.value) for e in accumulator.Scalars("dp_epsilon")]
    assert sorted(recorded) == list(HOSPITALS)
    for name in HOSPITALS:
        own = json.loads(Path(summary["hospitals"][name]["results"]).read_text())
        assert [step for step, _ in recorded[name]] == list(range(1, ROUNDS + 1))
        assert [value for _, value in recorded[name]] == pytest.approx(own["dp"]["epsilon_per_round"], rel=1e-6)
