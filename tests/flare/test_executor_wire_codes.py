"""flare.executor: a site quantizes on its device exactly when the chain it releases through starts with the job's
quantizer, and what leaves after the job's filters is the same bytes either way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakes import WorkspaceEngine
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.class_utils import load_class

from splitunet.data.sampling import window_plan
from splitunet.filters import ChannelDropout
from splitunet.flare.executor import SplitSiteExecutor
from splitunet.flare.replies import reply_error_message
from splitunet.wire.codec import SENDER_ENCODED_META_KEY
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MetaKey, TaskName
from splitunet.wire.transport import control_dxo, register_tensor_support

CONFIG = SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(0, 1, 2, 3))
JOB_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "split_unet" / "app" / "config" / "config_fed_client.json"


@pytest.fixture(autouse=True)
def own_settings_only(monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)


def _context(root: Path, tiny_parties, scope_filters=None) -> FLContext:
    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    settings = {"case_key_secret": "s", "parties": {"site-2": {"modality": "t1", "data_dir": str(tiny_parties / "t1")}}}
    (root / "local" / "splitunet_site.json").write_text(json.dumps(settings))
    config_dir = root / "job-1" / "app_site-2" / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(JOB_CONFIG, config_dir / "config_fed_client.json")
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, WorkspaceEngine(Workspace(str(root), "site-2")), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-2", private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    if scope_filters is not None:
        scope = SimpleNamespace(name="strict", task_result_filters={FilterKey.OUT: scope_filters})
        fl_ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=False, sticky=False)
    return fl_ctx


def _executor(fl_ctx) -> SplitSiteExecutor:
    executor = SplitSiteExecutor(device="cpu")
    meta = {MetaKey.CONFIG: CONFIG.to_dict(), MetaKey.EXPERIMENT: "split_unet"}
    executor.execute(TaskName.SETUP, control_dxo(meta).to_shareable(), fl_ctx, Signal())
    return executor


def _released(executor: SplitSiteExecutor, fl_ctx) -> bytes:
    """One step's features through the job's result filters, as FLARE serializes them (compute time zeroed)."""
    keys = sorted(executor.trainer.key_to_case)[:1]
    plan = window_plan(keys, [[0, 2, 1]], [32, 32, 32])
    step = control_dxo({MetaKey.ITERATION: 1, MetaKey.PLAN: plan}).to_shareable()
    reply = executor.execute(TaskName.STEP, step, fl_ctx, Signal())
    assert reply_error_message(reply) is None
    dxo = from_shareable(reply)
    assert sorted(dxo.data) == ["x0", "x1", "x2", "x3", "x4"]
    assert (SENDER_ENCODED_META_KEY in dxo.meta) == (executor.trainer.wire_bits is not None)
    dxo.meta[MetaKey.SITE_COMPUTE_S] = 0.0
    shareable = dxo.to_shareable()
    for entry in json.loads(JOB_CONFIG.read_text())["task_result_filters"][0]["filters"]:
        shareable = load_class(entry["path"])(**entry["args"]).process(shareable, FLContext())
    register_tensor_support()
    return fobs.dumps(shareable)


def test_the_main_job_quantizes_on_the_device_and_releases_the_same_bytes(tmp_path, tiny_parties):
    fl_ctx = _context(tmp_path / "coded", tiny_parties)
    coded = _executor(fl_ctx)
    assert coded.trainer.wire_bits == 8
    dense_ctx = _context(tmp_path / "dense", tiny_parties)
    dense = _executor(dense_ctx)
    dense.trainer.wire_bits = None  # the host path: the job's filter quantizes the dense features
    sent = _released(coded, fl_ctx)
    assert sent == _released(dense, dense_ctx)
    assert SENDER_ENCODED_META_KEY not in from_shareable(fobs.loads(sent)).meta


def test_a_scope_filter_that_needs_dense_features_keeps_them_dense(tmp_path, tiny_parties):
    executor = _executor(_context(tmp_path, tiny_parties, scope_filters=[ChannelDropout(0.25)]))
    assert executor.trainer.wire_bits is None
