"""Features quantized by the site's trainer (``wire_bits``) and decoded by the server's trainer: the same step as
quantizing on the host, and on a GPU only codes and scales cross PCIe."""

from __future__ import annotations

import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.utils import fobs
from wire_code_parties import CONFIG, assert_host_codec, one_site_server, t1_site, two_crop_plan

from splitunet.filters import FeatureGuard, QuantizeFeatures
from splitunet.wire.codec import EncodedLevel, quantize_affine
from splitunet.wire.protocol import DataKind
from splitunet.wire.transport import dxo_to_features, features_to_dxo, register_tensor_support

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _received(features) -> dict:
    """The job's site result chain, FOBS, and what the controller hands the server's trainer."""
    register_tensor_support()
    shareable = features_to_dxo(features, DataKind.ACTIVATIONS, {"iteration": 1}).to_shareable()
    for filter_ in (QuantizeFeatures("int8"), FeatureGuard()):
        shareable = filter_.process(shareable, FLContext())
    dxo = from_shareable(fobs.loads(fobs.dumps(shareable)))
    return dxo_to_features(dxo, DataKind.ACTIVATIONS, party="site-2", keep_encoded=True)


def test_site_codes_are_the_host_codec_of_its_features(tiny_parties):
    dense_site, coded_site = t1_site(tiny_parties), t1_site(tiny_parties, wire_bits=8)
    plan = two_crop_plan(dense_site)
    dense, coded = dense_site.forward(plan), coded_site.forward(plan)
    assert_host_codec(coded, dense)
    # The gradients come back dense, as before.
    coded_site.backward({level: torch.ones_like(t) for level, t in dense.items()})
    assert coded_site.steps_applied == 1


def test_the_server_decodes_what_the_host_codec_would_have_sent(tiny_parties):
    dense_site, coded_site = t1_site(tiny_parties), t1_site(tiny_parties, wire_bits=8)
    plan = two_crop_plan(dense_site)
    from_host, from_site = _received(dense_site.forward(plan)), _received(coded_site.forward(plan))
    assert all(isinstance(value, EncodedLevel) for value in from_site.values())
    assert coded_site.staging.bytes_to_host == 0  # a CPU trainer copies nothing
    server = one_site_server(tiny_parties)
    # The decoder's inputs, bit for bit: the step on them is the step on host-quantized features.
    host_inputs, site_inputs = (server._leaves([received])[0] for received in (from_host, from_site))
    for level, tensor in host_inputs.items():
        assert site_inputs[level].requires_grad and torch.equal(site_inputs[level], tensor)


@needs_cuda
def test_on_a_gpu_only_codes_and_scales_cross_and_decode_to_the_host_codec(tiny_parties):
    site = t1_site(tiny_parties, "cuda", wire_bits=8)
    generator = torch.Generator().manual_seed(1)
    dense = [torch.randn(2, c, *(32 // 2**level,) * 3, generator=generator) for level, c in enumerate(CONFIG.features)]
    sent = site._to_wire([t.cuda() for t in dense], "features")
    expected_bytes = 0
    for level, value in sent.items():
        assert value.payload.device.type == "cpu" and value.payload.is_pinned()
        payload, encoding = quantize_affine(dense[level], 8)
        assert torch.equal(value.payload, payload) and torch.equal(value.encoding["step"], encoding["step"])
        expected_bytes += value.nbytes
    assert site.staging.bytes_to_host == expected_bytes
    assert expected_bytes < sum(t.numel() * 4 for t in dense) / 3.9
    server = one_site_server(tiny_parties, "cuda")
    before = server.staging.bytes_to_device
    leaves = server._leaves([{level: value.map_tensors(torch.clone) for level, value in sent.items()}])[0]
    assert server.staging.bytes_to_device - before == expected_bytes
    for level, leaf in leaves.items():
        assert leaf.device.type == "cuda" and leaf.dtype == torch.float32
        assert torch.equal(leaf.detach().cpu(), sent[level].decode())
