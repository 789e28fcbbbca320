"""Gradients quantized by the server's trainer (``wire_bits``) and decoded by the site's trainer: the same bytes
leave the server's chain as when its filter quantizes dense gradients, the site takes the same step, and the
controller asks for codes exactly when the job's gradient chain starts with a quantizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fakes import WorkspaceEngine
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.fuel.utils import fobs
from wire_code_parties import assert_host_codec, one_site_server, t1_site, two_crop_plan

from splitunet.filters import FeatureGuard, QuantizeFeatures
from splitunet.flare import job_filters
from splitunet.wire.codec import SENDER_ENCODED_META_KEY
from splitunet.wire.protocol import DataKind, TaskName
from splitunet.wire.transport import dxo_to_features, features_to_dxo, register_tensor_support

JOBS = Path(__file__).resolve().parents[2] / "jobs"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _step(tiny_parties, wire_bits):
    """One step of a fresh site and server; the site's gradients as the server's trainer returns them."""
    site, server = t1_site(tiny_parties), one_site_server(tiny_parties, wire_bits=wire_bits)
    plan = two_crop_plan(site)
    return site, server.train_step(plan, [site.forward(plan)]).grads[0]


def _sent(grads) -> bytes:
    """The gradients through the main job's server chain (quantizer, guard), as FLARE serializes them."""
    register_tensor_support()
    shareable = features_to_dxo(grads, DataKind.GRADIENTS, {"iteration": 1}).to_shareable()
    for filter_ in (QuantizeFeatures("int8"), FeatureGuard()):
        shareable = filter_.process(shareable, FLContext())
    return fobs.dumps(shareable)


def test_server_codes_are_the_host_codec_of_its_gradients(tiny_parties):
    _, dense = _step(tiny_parties, None)
    _, coded = _step(tiny_parties, 8)
    assert_host_codec(coded, dense)


def test_the_chain_sends_the_same_bytes_and_the_site_takes_the_same_step(tiny_parties):
    dense_site, dense = _step(tiny_parties, None)
    coded_site, coded = _step(tiny_parties, 8)
    sent_dense, sent_coded = _sent(dense), _sent(coded)
    assert sent_coded == sent_dense
    dxo = from_shareable(fobs.loads(sent_coded))
    assert SENDER_ENCODED_META_KEY not in dxo.meta  # the filter took the codes as its own
    # The site decodes on its device what arrives still encoded; the host path hands it dense tensors.
    dense_site.backward(dxo_to_features(dxo, DataKind.GRADIENTS, party="server"))
    coded_site.backward(dxo_to_features(dxo, DataKind.GRADIENTS, party="server", keep_encoded=True))
    for before, after in zip(dense_site.encoder.parameters(), coded_site.encoder.parameters()):
        assert torch.equal(before, after)


def _server_context(root: Path, job: str) -> FLContext:
    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True)
    config_dir = root / "job-1" / "app_server" / "config"
    config_dir.mkdir(parents=True)
    shutil.copy(JOBS / job / "app" / "config" / job_filters.SERVER_CONFIG, config_dir)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, WorkspaceEngine(Workspace(str(root), "server")), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    return fl_ctx


@pytest.mark.parametrize(
    ("job", "bits"),
    [("split_unet", 8), ("split_unet_pipelined", 8), ("split_unet_fp32", None), ("split_unet_grad_noise", None)],
)
def test_the_controller_codes_gradients_only_behind_a_leading_quantizer(tmp_path, job, bits):
    fl_ctx = _server_context(tmp_path, job)
    tasks = (TaskName.STEP, TaskName.AVERAGE)
    config = job_filters.SERVER_CONFIG
    assert job_filters.sender_wire_bits(fl_ctx, config, "task_data_filters", tasks, DataKind.GRADIENTS) == bits


@needs_cuda
def test_on_a_gpu_only_gradient_codes_and_scales_cross_to_the_host(tiny_parties):
    site, server = t1_site(tiny_parties, "cuda"), one_site_server(tiny_parties, "cuda", wire_bits=8)
    plan = two_crop_plan(site)
    features = site.forward(plan)
    before = server.staging.bytes_to_host
    grads = server.train_step(plan, [features]).grads[0]
    coded_bytes = sum(value.nbytes for value in grads.values())
    assert all(value.payload.device.type == "cpu" and value.payload.is_pinned() for value in grads.values())
    assert server.staging.bytes_to_host - before == coded_bytes
    assert coded_bytes < sum(t.numel() * 4 for t in features.values()) / 3.9
    site.backward(grads)
    assert site.steps_applied == 1
