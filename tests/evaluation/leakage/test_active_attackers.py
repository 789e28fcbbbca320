"""active_attackers: encoder tracking over consecutive captures, and the simulated malicious server."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from splitunet.atomic_files import write_json_atomic
from splitunet.checkpoint import save_checkpoint
from splitunet.data.party_data import ModalityFolder
from splitunet.evaluation.attacks import decoder_gradient_fn, simulate_site_training
from splitunet.evaluation.leakage import CapturedRun, GroundTruth
from splitunet.evaluation.leakage.active_attackers import malicious_server_section, random_plan, tracking_section
from splitunet.evaluation.leakage.ground_truth import AuxiliaryImages
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES, DataKind

FEATURES = (4, 8, 8, 16, 16, 4)
SITE_SEED = 2**40 + 17  # the site's private seed, handed to the attacker (the worst case)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def truth(workspace, secret):
    return GroundTruth(workspace / "data" / "parties", secret)


@pytest.fixture(scope="module")
def aux(workspace):
    # The other phantom cases stand in for the attacker's auxiliary scans (scoring wiring only).
    return AuxiliaryImages(ModalityFolder(workspace / "data" / "parties" / "flair", "flair", party="attacker"))


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, workspace, secret, truth):
    """A run whose site-1 captures cover iterations 1-3 (and the gradients sent back, 2-4)."""
    run = tmp_path_factory.mktemp("tracked_run")
    shutil.copytree(workspace / "data", run / "data")
    model = SplitModelConfig(features=FEATURES, skip_levels=(0, 1, 2, 3))
    plans = [random_plan(truth, 2, (32, 32, 32), seed) for seed in range(3)]
    crops = [truth.image_crops("flair", plan) for plan in plans]
    targets = [torch.cat([truth.region_crops(plan, r) for r in ("TC", "WT", "ET")], 1) for plan in plans]
    site = simulate_site_training(FEATURES, crops, decoder_gradient_fn(FEATURES, targets), init_seed=SITE_SEED)
    captures = run / "simulator" / "server" / "simulate_job" / "captures"
    for index, plan in enumerate(plans):
        common = {"site": "site-1", "filter_trail": []}
        save_checkpoint(
            {
                "features": {f"x{k}": v for k, v in site.observed[index].items()},
                "iteration": index + 1,
                "plan": plan,
                "data_kind": DataKind.ACTIVATIONS,
                **common,
            },
            captures / DataKind.ACTIVATIONS / "site-1" / f"iteration_{index + 1:06d}.pt",
        )
        save_checkpoint(
            {
                "features": {f"x{k}": v for k, v in site.gradients[index].items()},
                "iteration": index + 2,
                "plan": None,
                "data_kind": DataKind.GRADIENTS,
                **common,
            },
            captures / DataKind.GRADIENTS / "site-1" / f"iteration_{index + 2:06d}.pt",
        )
    results = run / "simulator" / "server" / "simulate_job" / "results.json"
    write_json_atomic({"model": model.to_dict(), "sites": {"site-1": "flair"}, "status": "completed"}, results)
    write_json_atomic(
        {"job": "split_unet", "sites": {"site-1": "flair"}, "server_results": str(results)}, run / "results.json"
    )
    return CapturedRun(run)


def test_tracking_needs_consecutive_captures_with_their_gradients(workspace, truth, aux):
    assert tracking_section(CapturedRun(workspace), "site-1", 1, truth, aux, inversion_iterations=2) is None


def test_tracking_replays_every_captured_iteration_and_scores_each_against_its_own_prior(tracked_run, truth, aux):
    section = tracking_section(tracked_run, "site-1", SITE_SEED, truth, aux, inversion_iterations=8)
    assert section["iterations"] == [1, 2, 3] and section["level"] == "x0"
    rows = section["rows"]
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    # At iteration 1 the tracked encoder is the initial one: both attackers invert with the same weights.
    assert rows[0]["ssim"] == pytest.approx(rows[0]["ssim_untracked"])
    priors = {round(row["ssim_prior"], 6) for row in rows}
    assert len(priors) == 3  # each iteration's crops have their own prior


def test_the_malicious_server_section_reports_both_curves_and_the_false_alarms(workspace, truth, aux):
    section = malicious_server_section(
        truth,
        aux,
        list(MODALITIES),
        0,
        SplitModelConfig(features=FEATURES),
        (32, 32, 32),
        iterations=2,
        honest_seeds=(0,),
        crops=2,
    )
    assert section["modality"] == "flair"
    assert [row["iteration"] for row in section["curve"]][-1] == 2
    assert {"ssim_no_detector", "ssim_with_detector", "ssim_prior"} <= set(section["curve"][-1])
    assert section["detection"]["tested"] >= 1 and section["false_alarms"]["tested"] >= 1
    json.dumps(section)  # goes into report.json as it is
