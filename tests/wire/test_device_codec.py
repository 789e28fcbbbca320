"""The codec on a tensor's own device: the same bits as an independent float32 NumPy reference of the host codec.

The reference is the host codec written again in NumPy (per-(sample, channel) minimum, ``(max - min) / levels``,
``round`` half to even, clip, ``uint8``), so a change of the torch codec that moves one bit, on the CPU or on a CUDA
device, fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splitunet.wire.codec import AFFINE_BITS, EncodedLevel, decode_entry, quantize_affine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference_codes(tensor: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpacked codes ``(B, C, N)``, ``low`` and ``step`` of the host codec, computed in float32 NumPy."""
    flat = tensor.detach().cpu().float().numpy().reshape(tensor.shape[0], tensor.shape[1], -1)
    low, high = flat.min(axis=-1), flat.max(axis=-1)
    levels = np.float32((1 << bits) - 1)
    step = (high - low) / levels
    safe = np.where(step > 0, step, np.float32(1))
    with np.errstate(invalid="ignore"):
        codes = np.clip(np.round((flat - low[..., None]) / safe[..., None]), 0, levels).astype(np.uint8)
    return codes, low, step


def reference_decode(codes: np.ndarray, low: np.ndarray, step: np.ndarray) -> np.ndarray:
    return low[..., None] + codes.astype(np.float32) * step[..., None]


def unpacked(payload: torch.Tensor, bits: int, length: int) -> np.ndarray:
    per_byte = 8 // bits
    packed = payload.cpu().numpy().astype(np.int32)
    codes = (packed[..., None] >> (np.arange(per_byte) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :length].astype(np.uint8)


def _bits_of(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def _cases() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    random = torch.randn(2, 3, 5, 7, 9, generator=generator)
    constant = torch.full((1, 2, 4, 4, 4), -2.75)
    tiny = torch.randn(2, 2, 6, 6, 6, generator=generator) * 1e-39  # subnormal steps
    huge = torch.randn(2, 2, 6, 6, 6, generator=generator) * 1e36
    # Many exact halves: (x - min) / step lands on .5 for some elements, so round-half-to-even decides.
    halves = (torch.arange(2 * 2 * 1000, dtype=torch.float32).reshape(2, 2, 10, 10, 10) % 511) / 2
    mixed = random.clone()
    mixed[0, 1] = 0.0  # one constant channel among varying ones
    return {
        "random": random,
        "zeros": torch.zeros(2, 4, 3, 3, 3),
        "constant": constant,
        "tiny": tiny,
        "huge": huge,
        "halves": halves,
        "mixed": mixed,
        "odd": torch.randn(1, 1, 33, 34, 35, generator=generator),
    }


CASES = _cases()


def _assert_matches_reference(tensor: torch.Tensor, encoded: EncodedLevel, bits: int) -> None:
    codes, low, step = reference_codes(tensor, bits)
    length = math.prod(tensor.shape[2:])
    assert encoded.payload.dtype == torch.uint8
    np.testing.assert_array_equal(unpacked(encoded.payload, bits, length), codes)
    np.testing.assert_array_equal(_bits_of(encoded.encoding["low"].cpu().numpy()), _bits_of(low))
    np.testing.assert_array_equal(_bits_of(encoded.encoding["step"].cpu().numpy()), _bits_of(step))
    decoded = encoded.decode().cpu().numpy().reshape(codes.shape)
    np.testing.assert_array_equal(_bits_of(decoded), _bits_of(reference_decode(codes, low, step)))


@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_codec_equals_the_reference_bit_for_bit(case, bits):
    tensor = CASES[case]
    _assert_matches_reference(tensor, EncodedLevel.affine(tensor, bits), bits)
    # The functions the filters call give the very same tensors.
    payload, encoding = quantize_affine(tensor, bits)
    assert torch.equal(payload, EncodedLevel.affine(tensor, bits).payload)
    assert torch.equal(decode_entry(payload, encoding), EncodedLevel(payload, encoding).decode())


def test_half_way_values_round_to_even():
    # 0, 0.5, ..., 255 over a step of 1 after scaling: x.5 goes to the even neighbour, as NumPy's round does.
    tensor = torch.tensor([0.0, 0.5, 1.5, 2.5, 255.0]).reshape(1, 1, 5)
    payload, _ = quantize_affine(tensor, 8)
    assert payload.flatten().tolist() == [0, 0, 2, 2, 255]


def test_non_finite_inputs_give_non_finite_scales_for_the_guard_to_refuse():
    tensor = CASES["random"].clone()
    tensor[1, 2, 0, 0, 0] = float("inf")
    encoded = EncodedLevel.affine(tensor, 8)
    _, low, step = reference_codes(tensor, 8)
    np.testing.assert_array_equal(_bits_of(encoded.encoding["step"].numpy()), _bits_of(step))
    np.testing.assert_array_equal(_bits_of(encoded.encoding["low"].numpy()), _bits_of(low))
    assert not bool(torch.isfinite(encoded.encoding["step"]).all())
    # Every value of that channel decodes to NaN/Inf; the other channels are untouched.
    decoded = encoded.decode()
    assert not bool(torch.isfinite(decoded[1, 2]).any()) and bool(torch.isfinite(decoded[0]).all())


def test_encoded_level_moves_all_its_tensors():
    encoded = EncodedLevel.affine(CASES["random"], 4)
    assert set(encoded.tensors()) == {"payload", "low", "step"}
    assert encoded.nbytes == sum(t.numel() * t.element_size() for t in encoded.tensors().values())
    copied = encoded.map_tensors(torch.clone)
    assert copied.payload.data_ptr() != encoded.payload.data_ptr()
    assert torch.equal(copied.decode(), encoded.decode())


@needs_cuda
@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_codec_equals_the_reference_bit_for_bit(case, bits):
    tensor = CASES[case]
    on_device = EncodedLevel.affine(tensor.cuda(), bits)
    assert on_device.payload.device.type == "cuda" and on_device.encoding["step"].device.type == "cuda"
    _assert_matches_reference(tensor, on_device, bits)
    # Host codes decoded on the device, and device codes decoded on the host: the same bits either way.
    on_host = EncodedLevel.affine(tensor, bits)
    assert torch.equal(on_host.map_tensors(torch.Tensor.cuda).decode().cpu(), on_host.decode())
    assert torch.equal(on_device.map_tensors(torch.Tensor.cpu).decode(), on_host.decode())


@needs_cuda
def test_cuda_codec_on_random_activations_of_every_scale():
    generator = torch.Generator().manual_seed(7)
    for scale in (1e-30, 1e-3, 1.0, 1e3, 1e30):
        tensor = torch.randn(2, 8, 16, 16, 16, generator=generator) * scale
        tensor = tensor + torch.randn(2, 8, 1, 1, 1, generator=generator) * scale
        _assert_matches_reference(tensor, EncodedLevel.affine(tensor.cuda(), 8), 8)
