"""CaptureWeights: the server's record of the encoder weights of a SplitFed averaging, and how a job gets it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes import server_filter_context
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import FilterKey
from nvflare.apis.fl_context import FLContext

from splitunet.checkpoint import load_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.filters import CaptureWeights
from splitunet.filters import capture_weights as capture_module
from splitunet.filters.capture_weights import RECEIVED, SENT, weights_capture_path
from splitunet.flare.encoder_weights import encoder_to_dxo
from splitunet.tools.deployment import (
    add_capture_filter,
    add_weights_capture_filter,
    copy_job_with_overrides,
    find_job,
)
from splitunet.wire.protocol import DataKind, MetaKey, TaskName
from splitunet.wire.transport import features_to_dxo


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module, "run_dir", lambda fl_ctx: tmp_path)
    return tmp_path


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    return {
        "conv_0.conv_0.conv.weight": generator.standard_normal((4, 1, 3, 3, 3)).astype(np.float32),
        "conv_0.conv_0.conv.bias": generator.standard_normal(4).astype(np.float32),
        "counter": np.array(7, dtype=np.int64),
    }


def test_records_each_direction_as_it_crossed_and_passes_the_weights_on_unchanged(run_folder):
    capture = CaptureWeights()
    for direction, name, seed in ((FilterKey.IN, RECEIVED, 0), (FilterKey.OUT, SENT, 1)):
        state = _state(seed)
        shareable = encoder_to_dxo(state, {MetaKey.ITERATION: 10}).to_shareable()
        out = from_shareable(capture.process(shareable, server_filter_context("site-5", direction)))
        assert all(np.array_equal(out.data[key], value) for key, value in state.items())
        record = load_checkpoint(weights_capture_path(run_folder / "captures", name, "site-5", 10))
        assert (record["site"], record["iteration"], record["direction"]) == ("site-5", 10, name)
        for key, value in state.items():
            assert record["weights"][key].dtype == torch.from_numpy(value).dtype
            assert np.array_equal(record["weights"][key].numpy(), value)
    assert capture.captured == 2


def test_only_weights_of_the_chosen_iterations_are_recorded(run_folder):
    capture = CaptureWeights(iterations=[20], max_captures=1)
    features = {0: torch.zeros(1, 4, 8, 8, 8)}
    feature_dxo = features_to_dxo(features, DataKind.ACTIVATIONS, {MetaKey.ITERATION: 20})
    capture.process(feature_dxo.to_shareable(), server_filter_context("site-1", FilterKey.IN))  # not a WEIGHTS DXO
    other_iteration = encoder_to_dxo(_state(), {MetaKey.ITERATION: 10}).to_shareable()
    capture.process(other_iteration, server_filter_context("site-1", FilterKey.IN))
    for site in ("site-1", "site-2"):  # the second is beyond max_captures
        shareable = encoder_to_dxo(_state(), {MetaKey.ITERATION: 20}).to_shareable()
        capture.process(shareable, server_filter_context(site, FilterKey.IN))
    files = sorted(p.relative_to(run_folder).as_posix() for p in run_folder.rglob("*.pt"))
    assert files == ["captures/weights/received/site-1/iteration_000020.pt"]


def test_outside_a_filter_chain_it_refuses_rather_than_guess_the_direction(run_folder):
    shareable = DXO(data_kind="WEIGHTS", data=_state(), meta={MetaKey.ITERATION: 1}).to_shareable()
    with pytest.raises(RuntimeError, match="direction"):
        CaptureWeights().process(shareable, FLContext())


@pytest.mark.parametrize("kwargs", [{"max_captures": 0}, {"max_captures": True}, {"iterations": ["x"]}])
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(SplitUNetConfigError):
        CaptureWeights(**kwargs)


def test_a_splitfed_job_gets_both_capture_filters_last_in_the_servers_chains(tmp_path):
    job = copy_job_with_overrides(find_job("split_unet_splitfed"), tmp_path / "job")
    add_capture_filter(job, [11, 12], data_kinds=[DataKind.ACTIVATIONS], max_captures=9)
    add_weights_capture_filter(job)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    for chain_name in ("task_result_filters", "task_data_filters"):
        for task in (TaskName.STEP, TaskName.AVERAGE):
            assert len([c for c in server[chain_name] if task in c["tasks"]]) == 1  # one chain per task and direction
        chain = next(c for c in server[chain_name] if TaskName.AVERAGE in c["tasks"])
        assert chain["filters"][-2:] == [
            {
                "path": "splitunet.filters.CaptureFeatures",
                "args": {"iterations": [11, 12], "data_kinds": [DataKind.ACTIVATIONS], "max_captures": 9},
            },
            {"path": "splitunet.filters.CaptureWeights", "args": {}},
        ]
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert "Capture" not in json.dumps(client)
