import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import ClippedGaussianNoise, QuantizeFeatures
from splitunet.wire.protocol import SITE_ERROR_HEADER, DataKind, MetaKey
from splitunet.wire.transport import dxo_to_features, payload_bytes


@pytest.mark.parametrize("precision, bits", [("int8", 8), ("int4", 4), ("int2", 2), ("int1", 1)])
def test_integer_dequantization_error_is_at_most_half_a_step(run_filter, features, precision, bits):
    _, dxo = run_filter(QuantizeFeatures(precision), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    for level, tensor in features.items():
        flat = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
        step = (flat.amax(-1) - flat.amin(-1)) / (2**bits - 1)
        error = (out[level] - tensor).abs().reshape(flat.shape).amax(-1)
        assert out[level].dtype == torch.float32 and out[level].shape == tensor.shape
        assert torch.all(error <= step / 2 * (1 + 1e-4) + 1e-6), level


@pytest.mark.parametrize("precision, ratio", [("float16", 2), ("int8", 4), ("int4", 8), ("int2", 16)])
def test_bytes_shrink_by_the_bit_ratio(run_filter, features, precision, ratio):
    original = sum(t.numel() * 4 for t in features.values())
    shareable, dxo = run_filter(QuantizeFeatures(precision), features)
    sent = payload_bytes(dxo)
    # Per-channel minimum and step add a few bytes per channel.
    assert original / ratio <= sent <= original / ratio * 1.1
    record = dxo.get_meta_prop(MetaKey.FILTER_TRAIL)[-1]
    assert record["bytes_in"] == original and record["bytes_out"] == sent


def test_float16_is_a_cast(run_filter, features):
    _, dxo = run_filter(QuantizeFeatures("float16"), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    for level, tensor in features.items():
        assert out[level].dtype == torch.float16
        torch.testing.assert_close(out[level].float(), tensor, rtol=1e-3, atol=1e-3)


def test_gradients_are_quantized_too(run_filter, features):
    grads = {level: t * 1e-6 for level, t in features.items()}
    _, dxo = run_filter(QuantizeFeatures("int8"), grads, kind=DataKind.GRADIENTS)
    out = dxo_to_features(dxo, DataKind.GRADIENTS)
    torch.testing.assert_close(out[0], grads[0], atol=1e-7, rtol=0.0)


def test_a_filter_after_an_integer_encoding_refuses_with_a_clear_error(run_filter, features):
    shareable, dxo = run_filter(QuantizeFeatures("int8"), features)
    rejected = ClippedGaussianNoise(1.0, 1.0).process(shareable, FLContext())
    message = rejected.get_header(SITE_ERROR_HEADER)
    assert "ClippedGaussianNoise" in message and "already encoded" in message and "must come last" in message


def test_unknown_precision_fails_at_construction():
    with pytest.raises(SplitUNetConfigError, match="precision"):
        QuantizeFeatures("int3")


def test_the_jobs_int8_after_a_sites_int4_leaves_the_int4_codes_as_they_are(run_filter, features):
    # A site's scope filters run before the job's: its stronger quantization must survive the job's int8.
    shareable, int4 = run_filter(QuantizeFeatures("int4"), features)
    after = from_shareable(QuantizeFeatures("int8").process(shareable, FLContext()))
    assert payload_bytes(after) == payload_bytes(int4)
    for level, expected in dxo_to_features(int4, DataKind.ACTIVATIONS).items():
        assert torch.equal(dxo_to_features(after, DataKind.ACTIVATIONS)[level], expected)


def test_int8_after_a_float16_cast_quantizes_the_half_precision_values(run_filter, features):
    shareable, _ = run_filter(QuantizeFeatures("float16"), features)
    after = from_shareable(QuantizeFeatures("int8").process(shareable, FLContext()))
    out = dxo_to_features(after, DataKind.ACTIVATIONS)
    for level, tensor in features.items():
        flat = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
        step = (flat.amax(-1) - flat.amin(-1)) / 255
        error = (out[level].float() - tensor).abs().reshape(flat.shape).amax(-1)
        # Half a step of int8 plus the float16 rounding before it.
        assert torch.all(error <= step / 2 + flat.abs().amax(-1) * 1e-3 + 1e-6), level
