import pytest
import torch

from splitunet.wire.codec import (
    AFFINE_BITS,
    decode_entry,
    densify_top_k,
    dequantize_affine,
    entry_bytes,
    quantize_affine,
    sparsify_top_k,
)


@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 3), (1, 1, 33, 34, 35)])
def test_affine_round_trip_within_half_a_step_for_odd_sizes(bits, shape):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    payload, encoding = quantize_affine(tensor, bits)
    assert payload.dtype == torch.uint8
    restored = dequantize_affine(payload, encoding)
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype
    step = encoding["step"][..., None, None, None]
    assert torch.all((restored - tensor).abs() <= step / 2 + 1e-6)


def test_constant_channels_and_extremes_are_exact():
    tensor = torch.full((1, 2, 4, 4, 4), 3.5)
    tensor[0, 1, 0, 0, 0] = -1.0
    payload, encoding = quantize_affine(tensor, 4)
    restored = decode_entry(payload, encoding)
    torch.testing.assert_close(restored[0, 0], tensor[0, 0])
    assert restored[0, 1].min() == -1.0 and restored[0, 1].max() == 3.5


def test_packing_shares_bytes():
    tensor = torch.randn(1, 1, 8, 8, 8)
    assert quantize_affine(tensor, 4)[0].numel() == 256
    assert quantize_affine(tensor, 1)[0].numel() == 64


def test_top_k_round_trip_and_bytes():
    tensor = torch.randn(2, 3, 4, 4, 4)
    values, encoding = sparsify_top_k(tensor, 0.25)
    dense = densify_top_k(values, encoding)
    assert (dense != 0).sum() == 2 * 48
    assert entry_bytes(values, encoding) == 2 * 48 * (4 + 4)


def test_unknown_scheme_is_an_error():
    with pytest.raises(ValueError, match="unknown wire encoding"):
        decode_entry(torch.zeros(1), {"scheme": "zip"})
    with pytest.raises(ValueError, match="bits"):
        quantize_affine(torch.zeros(1, 1, 2), 3)
