import json

import pytest
import torch
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import QuantizeFeatures, WireAudit
from splitunet.filters import wire_audit as audit_module
from splitunet.filters.wire_audit import tensor_digest
from splitunet.wire.protocol import DataKind, MetaKey
from splitunet.wire.transport import dxo_to_features


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_module, "run_dir", lambda fl_ctx: tmp_path)
    return tmp_path


def _records(folder):
    (path,) = list(folder.glob("audit/wire_*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_digest_of_every_entry_and_the_payload_passes_unchanged(run_filter, features, run_folder):
    plan = {"keys": ["3f2a"], "origins": [[0, 0, 0]], "size": [32, 32, 32], "flips": [[False] * 3]}
    _, dxo = run_filter(WireAudit(), features, meta={MetaKey.ITERATION: 4, MetaKey.PLAN: plan})
    for level, tensor in dxo_to_features(dxo, DataKind.ACTIVATIONS).items():
        assert tensor.equal(features[level])
    (record,) = _records(run_folder)
    assert record["kind"] == DataKind.ACTIVATIONS and record["direction"] == "out"
    assert sorted(record["entries"]) == ["x0", "x1", "x2", "x3", "x4"]
    assert record["entries"]["x2"] == tensor_digest(features[2])
    assert record["entries"]["x0"]["bytes"] == features[0].numel() * 4
    assert record["meta"][MetaKey.PLAN] == plan and record["meta"][MetaKey.ITERATION] == 4


def test_encoded_entries_are_audited_as_sent(run_filter, features, run_folder, through_fobs):
    quantized, _ = run_filter(QuantizeFeatures("int4"), features)
    WireAudit().process(quantized, FLContext())
    (record,) = _records(run_folder)
    assert record["entries"]["x0"]["dtype"] == "uint8"
    assert record["entries"]["x0"]["bytes"] < features[0].numel() // 2 + 64  # two codes per byte


def test_direction_and_non_dxo_payloads(run_folder):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.IN, private=True, sticky=False)
    WireAudit().process(Shareable(), ctx)
    (record,) = _records(run_folder)
    assert record["direction"] == "in" and record["kind"] is None


def test_digest_tells_tensors_apart():
    a = torch.zeros(3, 4)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a)["sha256"] != tensor_digest(a + 1e-6)["sha256"]
    assert tensor_digest(a.half())["bytes"] == 24


@pytest.mark.parametrize("folder", ["", "/abs", "../out"])
def test_folder_must_stay_inside_the_run_folder(folder):
    with pytest.raises(SplitUNetConfigError, match="relative sub-folder"):
        WireAudit(folder=folder)
