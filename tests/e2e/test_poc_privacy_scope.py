"""End to end in POC mode: a site's privacy policy defends its activations even when the job configures no filter.

FLARE runs a site's ``local/privacy.json`` scope filters before the job's (the simulator never sets a scope on
clients, so this needs real site processes). site-1's policy states a minimum defense (strong Gaussian noise) and
defines three scopes; the job has no site filter at all, and the server records what it receives with the opt-in
capture filter. A job under the default scope and a job naming the other compliant scope both deliver noised
activations (measured on the captures, against the other sites, which have no policy); a job naming the scope
that falls short of the minimum is refused by site-1 at setup, with the reason, before any activation leaves.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_job import tiny_server_args

from splitunet.checkpoint import load_checkpoint
from splitunet.tools.demo import ensure_partitioned_phantom
from splitunet.tools.deployment import copy_job_with_overrides, default_site_modalities, find_job
from splitunet.tools.poc import PocConsortium, PocTimeouts
from splitunet.wire.protocol import DataKind

pytestmark = pytest.mark.e2e

SITES = default_site_modalities(4)
TINY = tiny_server_args(num_iterations=4, batch_size=1, val_every=4, num_val_cases=1, log_every=2)
NOISE_MULTIPLIER, CLIP_RMS = 0.01, 1.0
# x0 holds 4 channels of 32^3 per sample: noise std = sigma * clip_rms * sqrt(elements).
EXPECTED_NOISE_STD = NOISE_MULTIPLIER * CLIP_RMS * math.sqrt(4 * 32**3)
NOISE = {
    "path": "splitunet.filters.ClippedGaussianNoise",
    "args": {"clip_rms": CLIP_RMS, "noise_multiplier": NOISE_MULTIPLIER},
}
HALF_PRECISION = {"path": "splitunet.filters.QuantizeFeatures", "args": {"precision": "float16"}}
SITE_POLICY = {
    "splitunet_minimum_defense": {"ClippedGaussianNoise": {"noise_multiplier": NOISE_MULTIPLIER}},
    "scopes": [
        {"name": "noisy", "task_result_filters": [NOISE]},
        {"name": "noisy_half", "task_result_filters": [NOISE, HALF_PRECISION]},
        # Below the site's own minimum: a job naming it must be refused.
        {"name": "weak", "task_result_filters": [HALF_PRECISION]},
    ],
    "default_scope": "noisy",
}


def _job_without_site_filters(root, scope=None):
    job = copy_job_with_overrides(find_job(), root / "job" / (scope or "default"), TINY)
    client_path = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_path.read_text())
    client["task_data_filters"], client["task_result_filters"] = [], []
    client_path.write_text(json.dumps(client, indent=2))
    server_path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    server["task_data_filters"] = []
    capture = {"path": "splitunet.filters.CaptureFeatures", "args": {"iterations": [1, 2, 3, 4]}}
    server["task_result_filters"] = [{"tasks": ["split_step"], "filters": [capture]}]
    server_path.write_text(json.dumps(server, indent=2))
    meta = json.loads((job / "meta.json").read_text())
    assert "scope" not in meta  # without one, the site's default scope applies
    if scope:
        meta["scope"] = scope
        (job / "meta.json").write_text(json.dumps(meta, indent=2))
    return job


@pytest.fixture(scope="module")
def scope_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc_scope")
    parties = ensure_partitioned_phantom(root / "data", cases=4, shape=(32, 32, 32), seed=7)
    poc = PocConsortium(
        root / "ws",
        SITES,
        parties,
        "poc-scope-secret",
        privacy_policies={"site-1": SITE_POLICY},
        timeouts=PocTimeouts(start_s=90, stop_s=45, admin_call_s=30),
        evaluation=True,  # the server records what it receives (CaptureFeatures)
    )
    runs = {}
    with poc:
        poc.prepare()
        poc.start()
        for scope in (None, "noisy_half", "weak"):
            job_id = poc.submit(_job_without_site_filters(root, scope))
            status = poc.wait(job_id, timeout_s=150)
            runs[scope] = {"status": status, "run_dirs": {party: poc.run_dir(job_id, party) for party in poc.parties}}
    return runs


def _captured_x0(run_dirs, site) -> torch.Tensor:
    files = sorted((run_dirs["server"] / "captures" / DataKind.ACTIVATIONS / site).glob("iteration_*.pt"))
    assert len(files) == TINY["num_iterations"], f"captures of {site}: {files}"
    return torch.cat([load_checkpoint(path)["features"]["x0"].flatten() for path in files])


@pytest.mark.parametrize("scope", [None, "noisy_half"])
def test_the_jobs_under_compliant_scopes_ran(scope_run, scope):
    assert scope_run[scope]["status"] == "FINISHED:COMPLETED"
    results = json.loads((scope_run[scope]["run_dirs"]["server"] / "results.json").read_text())
    assert results["status"] == "completed", results.get("error")


@pytest.mark.parametrize("scope", [None, "noisy_half"])
def test_server_receives_noisy_activations_from_the_site_with_the_policy_only(scope_run, scope):
    run_dirs = scope_run[scope]["run_dirs"]
    noisy = _captured_x0(run_dirs, "site-1")
    # Encoder activations end in LeakyReLU(0.1) after instance norm: values below -1 need a pre-activation of
    # about -10 standard deviations, so without noise there are none.
    for site in ("site-2", "site-3", "site-4"):
        clean = _captured_x0(run_dirs, site)
        assert clean.std() < 1.5 and (clean < -1).float().mean() < 1e-3, site
    measured_std = noisy.std().item()
    assert measured_std == pytest.approx(EXPECTED_NOISE_STD, rel=0.1)
    assert (noisy < -1).float().mean() > 0.3


def test_a_job_naming_a_scope_below_the_minimum_is_refused_by_that_site_with_its_reason(scope_run):
    run_dirs = scope_run["weak"]["run_dirs"]
    results = json.loads((run_dirs["server"] / "results.json").read_text())
    assert results["status"] == "failed" and results["iterations"] == 0
    error = results["error"]
    assert "site site-1 refuses this job" in error and "scope 'weak'" in error, error
    assert "ClippedGaussianNoise(noise_multiplier >= 0.01): not in the chain" in error, error
    assert not (run_dirs["server"] / "captures").exists()  # nothing left site-1, or any site
    assert "refuses this job" in (run_dirs["site-1"] / "log.txt").read_text()


def test_the_policy_filter_ran_at_its_site_only(scope_run):
    run_dirs = scope_run[None]["run_dirs"]
    results = json.loads((run_dirs["server"] / "results.json").read_text())
    assert "ClippedGaussianNoise@site-1" in results["filters"]["site-1"]
    for site in ("site-2", "site-3", "site-4"):
        assert not any(name.startswith("ClippedGaussianNoise") for name in results["filters"].get(site, {}))
        assert "ClippedGaussianNoise call" not in (run_dirs[site] / "log.txt").read_text()
    assert "ClippedGaussianNoise call 1 " in (run_dirs["site-1"] / "log.txt").read_text()
