"""End to end: the horizontal FedAvg baseline job (FLARE's FedAvg, PT persistor and GlobalModelEval around the
hospitals' executor) in the FLARE simulator, two tiny phantom hospitals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from splitunet.horizontal import FedAvgUNet
from splitunet.horizontal.demo import FedAvgDemoSettings, run_fedavg_demo

pytestmark = pytest.mark.e2e

FEATURES = [4, 8, 8, 16, 16, 4]
ROUNDS, LOCAL_ITERATIONS, CASES, LEARNING_RATE = 2, 2, 4, 0.005
HOSPITALS = ("hospital-1", "hospital-2")
REGIONS = ("TC", "WT", "ET")


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("fedavg")
    settings = FedAvgDemoSettings(
        hospitals=len(HOSPITALS),
        cases=CASES,
        shape=(32, 32, 32),
        seed=7,
        server_args={"num_rounds": ROUNDS},
        client_args={
            "local_iterations": LOCAL_ITERATIONS,
            "val_every": 1,
            "crop_size": [32, 32, 32],
            "features": FEATURES,
            "num_val_cases": 1,
            "learning_rate": LEARNING_RATE,
        },
        model_args={"features": FEATURES},
        timeout_s=300,
    )
    return workspace, run_fedavg_demo(workspace, settings)


def test_the_job_finishes_with_every_hospitals_dice_of_the_final_global_model(fedavg_run):
    workspace, summary = fedavg_run
    on_disk = json.loads((workspace / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["job"] == "fedavg_unet" and on_disk["simulator_exit_code"] == 0
    assert (on_disk["rounds"], on_disk["iterations"]) == (ROUNDS, ROUNDS * LOCAL_ITERATIONS)
    assert sorted(on_disk["hospitals"]) == list(HOSPITALS)
    # GlobalModelEval's collection at the server holds the same Dice each hospital keeps in its own results.
    cross_site = json.loads(Path(on_disk["cross_site_val"]).read_text())
    for name, entry in on_disk["hospitals"].items():
        assert all(0.0 <= entry["dice"][region] <= 1.0 for region in REGIONS)
        assert (entry["rounds"], entry["iterations"]) == (ROUNDS, ROUNDS * LOCAL_ITERATIONS)
        assert (entry["train_cases"], entry["val_cases"]) == (CASES - 1, 1)
        assert len(entry["loss_curve"]) == ROUNDS and np.isfinite(entry["loss_curve"]).all()
        # val_every=1: the global model after round 1 was scored when round 2 began.
        assert [point["round"] for point in entry["history"]] == [1]
        own = json.loads(Path(entry["results"]).read_text())
        assert own["party"] == name and own["dice"] == entry["dice"] and own["hd95"] == entry["hd95"]
        assert set(entry["hd95"]) == {*REGIONS, "mean"} and all(value >= 0.0 for value in entry["hd95"].values())
        assert Path(entry["results"]).is_relative_to(workspace / "simulator" / name)
        scored = cross_site[name]["SRV_FL_global_model.pt"]
        assert {region: scored[region] for region in REGIONS} == {region: entry["dice"][region] for region in REGIONS}
        assert {region: scored[f"hd95_{region}"] for region in REGIONS} == {
            region: entry["hd95"][region] for region in REGIONS
        }
    # One held-out case each: the pooled Dice is the hospitals' mean.
    for region in REGIONS:
        expected = np.mean([on_disk["hospitals"][name]["dice"][region] for name in HOSPITALS])
        assert on_disk["dice"][region] == pytest.approx(expected)


def test_the_persisted_global_model_moved_from_the_initial_one(fedavg_run):
    workspace, summary = fedavg_run
    path = Path(summary["global_model"])
    assert path.is_file() and path.is_relative_to(workspace / "simulator" / "server")
    saved = torch.load(path, weights_only=True)["model"]  # PTFileModelPersistor's format
    # The initial global model: what the server's model component built from the job as it ran.
    server_config = json.loads((workspace / "job" / "fedavg_unet" / "app/config/config_fed_server.json").read_text())
    [model] = [component for component in server_config["components"] if component["id"] == "model"]
    initial = FedAvgUNet(**model["args"]).state_dict()
    assert {name: tuple(t.shape) for name, t in saved.items()} == {name: tuple(t.shape) for name, t in initial.items()}
    change = max(float((saved[name] - initial[name]).abs().max()) for name in initial)
    # Trained from it: Adam moves a weight by about the learning rate per step (another initialisation would be
    # tenths away), and every hospital took ROUNDS * LOCAL_ITERATIONS steps.
    assert 0.0 < change < 3 * ROUNDS * LOCAL_ITERATIONS * LEARNING_RATE
