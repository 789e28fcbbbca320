"""jobs/split_unet_infer: the same site executor and guards as training, the inference workflow, and what it checks."""

from __future__ import annotations

import json

import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.signal import Signal

from splitunet.errors import SplitUNetConfigError
from splitunet.flare import SplitInferenceController
from splitunet.tools.deployment import bundle_root
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MetaKey
from splitunet.wire.transport import control_dxo

JOBS = bundle_root() / "jobs"


def _config(job: str, side: str) -> dict:
    return json.loads((JOBS / job / "app" / "config" / f"config_fed_{side}.json").read_text())


def test_sites_run_the_training_executor_and_the_same_guards():
    infer, train = _config("split_unet_infer", "client"), _config("split_unet", "client")
    [executor] = infer["executors"]
    training_executor = train["executors"][0]["executor"]
    # The same executor; "amp" is left out because it acts on training passes only (encoding stays float32).
    training_args = {k: v for k, v in training_executor["args"].items() if k != "amp"}
    assert executor["executor"] == {**training_executor, "args": training_args}
    assert executor["tasks"] == ["split_setup", "split_encode"]
    for side in ("client", "server"):
        for chain_name in ("task_data_filters", "task_result_filters"):
            [chain] = _config("split_unet_infer", side)[chain_name]
            assert chain["tasks"] == ["split_encode"]
            assert chain["filters"] == _config("split_unet", side)[chain_name][0]["filters"]


def test_workflow_builds_from_the_job():
    [workflow] = _config("split_unet_infer", "server")["workflows"]
    assert workflow["path"] == "splitunet.flare.SplitInferenceController"
    controller = SplitInferenceController(**workflow["args"])
    assert controller.settings.checkpoint == "best" and controller.settings.experiment == "split_unet"


def test_malformed_arguments_are_refused_by_the_controller():
    # Every argument's check is in tests/server/test_run_settings.py; the controller goes through those settings.
    with pytest.raises(SplitUNetConfigError, match="roi_size must be three ints >= 32"):
        SplitInferenceController(roi_size=[16, 32, 32])


def test_only_the_first_site_in_decoder_order_sends_the_headers():
    """Every grid is the same (checked by digest), so one site's NIfTI headers serve: the others send none."""
    controller = SplitInferenceController()
    controller.model_config = SplitModelConfig()
    controller.sites = ["site-a", "site-b"]  # by name; site-b holds flair, the first decoder input
    modality = {"site-a": "t1", "site-b": "flair"}
    cases = {"k1": {"shape": [32, 32, 32], "affine_digest": "grid"}}
    asked = []

    def round_trip(task_name, data, iteration, fl_ctx, abort_signal):
        replies = {}
        for site, shareable in data.items():
            headers = from_shareable(shareable).get_meta_prop(MetaKey.INFERENCE)["headers"]
            asked.append((site, headers))
            meta = {MetaKey.MODALITY: modality[site], MetaKey.CASES: cases}
            if headers:
                meta[MetaKey.HEADERS] = {"k1": {"dim": [3, 32, 32, 32]}}
            replies[site] = control_dxo(meta)
        return replies

    controller._round_trip = round_trip
    state = {"sites": ["site-b", "site-a"], "site_modality": {"site-b": "flair", "site-a": "t1"}}
    shapes, headers = controller._setup(state, Signal(), fl_ctx=None)
    assert asked == [("site-a", False), ("site-b", False), ("site-b", True)]
    assert controller.sites == ["site-b", "site-a"]
    assert shapes == {"k1": (32, 32, 32)} and headers == {"k1": {"dim": [3, 32, 32, 32]}}
