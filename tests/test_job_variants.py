"""Shipped job variants: each differs from the main job only in its filters (and what they force), and builds."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from splitunet.evaluation.defense_table import DEFENSE_JOBS
from splitunet.filters import FeatureGuard
from splitunet.tools.deployment import bundle_root

JOBS = bundle_root() / "jobs"
MAIN = JOBS / "split_unet"
# Variants that differ from the main job in workflow settings only, not in filters.
SETTING_VARIANTS = {
    "split_unet_missing_modality": {"fusion": "mean", "modality_dropout": 0.25, "on_site_failure": "continue"},
}
# Defense variants; the inference job (split_unet_infer) has a workflow of its own (tests/test_inference_job.py).
VARIANTS = sorted(
    path.name
    for path in JOBS.glob("split_unet_*")
    if path.is_dir() and path.name != "split_unet_infer" and path.name not in SETTING_VARIANTS
)

# What each variant is named for: (side, class name, arguments it must have).
PROMISED = {
    "split_unet_fp32": [],
    "split_unet_fp16": [("client", "QuantizeFeatures", {"precision": "float16"}), ("server", "QuantizeFeatures", {})],
    "split_unet_int4": [("client", "QuantizeFeatures", {"precision": "int4"})],
    "split_unet_topk": [("client", "TopKSparsify", {})],
    "split_unet_dropout": [("client", "ChannelDropout", {})],
    "split_unet_noise": [("client", "ClippedGaussianNoise", {})],
    "split_unet_no_x0": [("client", "BlockSkipLevels", {"levels": [0]})],
    "split_unet_grad_noise": [("server", "ClippedGaussianNoise", {})],
}
# Workflow settings a variant must change because of its filters.
FORCED_WORKFLOW_ARGS = {"split_unet_no_x0": {"skip_levels": [1, 2, 3]}}


def _config(job: Path, side: str) -> dict:
    return json.loads((job / "app" / "config" / f"config_fed_{side}.json").read_text())


def _without_filters(config: dict) -> dict:
    stripped = {k: v for k, v in config.items() if k not in ("task_data_filters", "task_result_filters")}
    return json.loads(json.dumps(stripped))


def _filters(config: dict):
    for chain_name in ("task_data_filters", "task_result_filters"):
        for chain in config.get(chain_name, []):
            for entry in chain["filters"]:
                yield chain_name, chain["tasks"], entry


def test_every_variant_is_promised_and_in_the_defense_table():
    assert VARIANTS == sorted(PROMISED)
    assert set(DEFENSE_JOBS) == {"split_unet", *VARIANTS}
    assert DEFENSE_JOBS[0] == "split_unet_fp32"  # the baseline row


def _quantizers(job: Path, side: str) -> list[dict]:
    return [entry for _, _, entry in _filters(_config(job, side)) if entry["path"].endswith(".QuantizeFeatures")]


def test_the_main_job_sends_int8_both_ways():
    # Activations leave each site, gradients leave the server, as int8 codes on every level.
    for side, chain_name in (("client", "task_result_filters"), ("server", "task_data_filters")):
        chain = _config(MAIN, side)[chain_name][0]["filters"]
        assert [entry["path"].rsplit(".", 1)[1] for entry in chain] == ["QuantizeFeatures", "FeatureGuard"]
        assert chain[0]["args"] == {"precision": "int8"}


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("split_unet_fp16", "split_unet_int4")])
def test_a_defense_variant_is_the_float32_reference_plus_its_defense(variant):
    # Each row of the defense table measures one defense alone, against the float32 reference.
    for side in ("client", "server"):
        assert not _quantizers(JOBS / variant, side)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_differs_from_the_main_job_only_in_filters(variant):
    job = JOBS / variant
    assert json.loads((job / "meta.json").read_text()) == {
        **json.loads((MAIN / "meta.json").read_text()),
        "name": variant,
    }
    assert _without_filters(_config(job, "client")) == _without_filters(_config(MAIN, "client"))
    server, main_server = _without_filters(_config(job, "server")), _without_filters(_config(MAIN, "server"))
    for workflow, main_workflow in zip(server["workflows"], main_server["workflows"]):
        main_workflow["args"].update(FORCED_WORKFLOW_ARGS.get(variant, {}))
        assert workflow == main_workflow
    assert server == main_server


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_holds_the_filters_it_is_named_for(variant):
    for side, class_name, args in PROMISED[variant]:
        entries = [entry for _, _, entry in _filters(_config(JOBS / variant, side))]
        matching = [e for e in entries if e["path"].endswith("." + class_name)]
        assert matching, f"{variant} has no {class_name} at the {side}"
        assert all(matching[0]["args"].get(k) == v for k, v in args.items())


@pytest.mark.parametrize("job", ["split_unet", *VARIANTS])
def test_every_filter_builds_and_the_guard_checks_last(job):
    for side in ("client", "server"):
        for _, tasks, entry in _filters(_config(JOBS / job, side)):
            module, class_name = entry["path"].rsplit(".", 1)
            built = getattr(importlib.import_module(module), class_name)(**entry.get("args", {}))
            assert {"split_step", "split_encode"} <= set(tasks)
        for chain_name in ("task_data_filters", "task_result_filters"):
            chain = _config(JOBS / job, side)[chain_name]
            assert chain and chain[0]["filters"][-1]["path"] == "splitunet.filters.FeatureGuard", (
                job,
                side,
                chain_name,
            )
    assert isinstance(built, FeatureGuard)


def test_a_level_blocking_variant_filters_the_setup_task_too():
    chain = _config(JOBS / "split_unet_no_x0", "client")["task_result_filters"][0]
    assert "split_setup" in chain["tasks"]


@pytest.mark.parametrize("variant", sorted(SETTING_VARIANTS))
def test_setting_variant_differs_from_the_main_job_only_in_its_settings(variant):
    job = JOBS / variant
    assert json.loads((job / "meta.json").read_text()) == {
        **json.loads((MAIN / "meta.json").read_text()),
        "name": variant,
    }
    assert _config(job, "client") == _config(MAIN, "client")
    server, main_server = _config(job, "server"), _config(MAIN, "server")
    main_server["workflows"][0]["args"].update(SETTING_VARIANTS[variant])
    assert server == main_server
    workflow = server["workflows"][0]
    module, class_name = workflow["path"].rsplit(".", 1)
    getattr(importlib.import_module(module), class_name)(**workflow["args"])
