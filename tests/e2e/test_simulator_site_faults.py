"""End to end in the simulator: a site that stops answering, resuming from checkpoints, continuing without a site.

One uninterrupted run is the reference. A second run loses site-3 at iteration 5 (its reply is held back past
``task_timeout``): it must stop naming the site and iteration, with every party's ``last`` checkpoint from
iteration 4 intact. A third run resumes from those checkpoints and must end with exactly the reference's weights
and losses. A fourth run (mean fusion, ``on_site_failure="continue"``, modality dropout) loses site-3 at iteration 3
and must finish without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_job import tiny_server_args

from splitunet.checkpoint import load_checkpoint
from splitunet.resume import decoder_checkpoint, encoder_checkpoint
from splitunet.tools.demo import ensure_partitioned_phantom
from splitunet.tools.deployment import (
    copy_job_with_overrides,
    default_site_modalities,
    find_job,
    prepare_simulator_workspace,
)
from splitunet.tools.simulator import find_run_file, run_simulator

pytestmark = pytest.mark.e2e

SITES = default_site_modalities(4)
# The consortium's sites keep their private encoder seeds from run to run, as real sites do in their local/.
ENCODER_SEEDS = {site: 1000 + index for index, site in enumerate(SITES)}
EXPERIMENT = "faults"
TINY = tiny_server_args(
    num_iterations=6,
    batch_size=1,
    val_every=6,
    checkpoint_every=2,
    num_val_cases=1,
    log_every=1,
    task_timeout=6,
    experiment=EXPERIMENT,
)
STALL_S = 15.0


@pytest.fixture(scope="module")
def parties(tmp_path_factory):
    return ensure_partitioned_phantom(tmp_path_factory.mktemp("data"), cases=4, shape=(32, 32, 32), seed=8)


def _with_fault(job: Path, site: str, iteration: int) -> Path:
    """Put the test-only SiteFault filter into the job (as custom code) at the end of the sites' step chain."""
    custom = job / "app" / "custom"
    custom.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("site_fault.py"), custom / "site_fault.py")
    client_path = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_path.read_text())
    chain = next(c for c in client["task_result_filters"] if "split_step" in c["tasks"])
    fault = {"site": site, "iteration": iteration, "mode": "stall", "seconds": STALL_S}
    chain["filters"].append({"path": "site_fault.SiteFault", "args": fault})
    client_path.write_text(json.dumps(client, indent=2))
    return job


def _run(root: Path, parties: Path, checkpoints: Path, fault=None, **overrides) -> dict:
    workspace = prepare_simulator_workspace(
        root / "sim", parties, SITES, "k", checkpoint_root=checkpoints, encoder_seeds=ENCODER_SEEDS
    )
    job = copy_job_with_overrides(find_job(), root / "job", {**TINY, **overrides})
    if fault:
        _with_fault(job, *fault)
    run_simulator(job, workspace, list(SITES), root / "sim.log", timeout_s=300, echo=False)
    results = json.loads(find_run_file(workspace, "server", "results.json").read_text())
    return {"results": results, "log": (root / "sim.log").read_text(), "checkpoints": checkpoints}


def _last_checkpoints(checkpoints: Path) -> dict[str, dict]:
    states = {"server": load_checkpoint(decoder_checkpoint(checkpoints / "server" / EXPERIMENT, "last"))}
    for site, modality in SITES.items():
        states[site] = load_checkpoint(encoder_checkpoint(checkpoints / site / EXPERIMENT, modality, "last"))
    return states


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from _tensors(tree[key], f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for index, item in enumerate(tree):
            yield from _tensors(item, f"{prefix}/{index}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, parties):
    root = tmp_path_factory.mktemp("reference")
    return _run(root, parties, root / "checkpoints")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, parties):
    root = tmp_path_factory.mktemp("interrupted")
    return _run(root, parties, root / "checkpoints", fault=("site-3", 5))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, parties, interrupted):
    root = tmp_path_factory.mktemp("resumed")
    return _run(root, parties, interrupted["checkpoints"], resume=True)


def test_reference_run_completes(reference):
    assert reference["results"]["status"] == "completed"
    assert reference["results"]["iterations"] == 6 and len(reference["results"]["loss_curve"]) == 6


def test_silent_site_stops_the_run_naming_site_and_iteration(interrupted):
    results = interrupted["results"]
    assert results["status"] == "failed"
    assert "site site-3 did not answer task split_step within 6s at iteration 5" in results["error"]
    assert results["iterations"] == 4
    assert "Split-U-Net run stopped" in interrupted["log"]


def test_every_party_keeps_its_last_checkpoint_of_iteration_4(interrupted):
    states = _last_checkpoints(interrupted["checkpoints"])
    assert {party: state["iteration"] for party, state in states.items()} == dict.fromkeys(states, 4)
    assert states["server"]["site_saved_iteration"] == dict.fromkeys(SITES, 4)


def test_resumed_run_ends_with_the_uninterrupted_weights(reference, resumed):
    results = resumed["results"]
    assert results["status"] == "completed", results.get("error")
    assert results["resumed_from"]["iteration"] == 4
    assert "resumed from iteration 4" in resumed["log"]
    # The first 4 losses come from the checkpoint, the last 2 were computed again: all must match exactly.
    assert results["loss_curve"] == reference["results"]["loss_curve"]
    assert results["dice"] == reference["results"]["dice"]
    expected, actual = _last_checkpoints(reference["checkpoints"]), _last_checkpoints(resumed["checkpoints"])
    for party in expected:
        assert actual[party]["iteration"] == 6
        pairs = list(zip(_tensors(expected[party]), _tensors(actual[party]), strict=True))
        assert len(pairs) > 10
        for (name, want), (_, got) in pairs:
            assert torch.equal(want, got), f"{party}{name} differs after resuming"


def test_resume_refuses_changed_model_settings(tmp_path, parties, interrupted):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(interrupted["checkpoints"], checkpoints)
    run = _run(tmp_path, parties, checkpoints, resume=True, learning_rate=0.01)
    assert run["results"]["status"] == "failed"
    assert "cannot resume" in run["results"]["error"] and "learning_rate: 0.005 -> 0.01" in run["results"]["error"]


def test_mean_fusion_continues_without_a_silent_site(tmp_path, parties):
    run = _run(
        tmp_path,
        parties,
        tmp_path / "checkpoints",
        fault=("site-3", 3),
        fusion="mean",
        on_site_failure="continue",
        modality_dropout=0.25,
    )
    results = run["results"]
    assert results["status"] == "completed", results.get("error")
    assert len(results["loss_curve"]) == 6
    [dropped] = results["dropped_sites"]
    assert (dropped["site"], dropped["modality"], dropped["iteration"]) == ("site-3", "t1gd", 3)
    assert "did not answer" in dropped["reason"]
    assert "continuing without site site-3 (t1gd) from iteration 3" in run["log"]
    assert sorted(results["dice_without"]) == ["flair", "t1", "t2"]
    # site-3 saved with the others at iteration 2, then never again; a resume would restart it from there.
    server = load_checkpoint(decoder_checkpoint(tmp_path / "checkpoints" / "server" / EXPERIMENT, "last"))
    assert server["site_saved_iteration"] == {"site-1": 6, "site-2": 6, "site-3": 2, "site-4": 6}
