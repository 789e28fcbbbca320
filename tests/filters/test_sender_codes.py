"""Codes made by the sender's trainer: the quantizing filter checks them and passes on the bytes it would have made,
and FeatureGuard judges codes and scales without decoding them, as it judged the decoded tensor."""

from __future__ import annotations

import pytest
import torch
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.utils import fobs

from splitunet.filters import ChannelDropout, FeatureGuard, QuantizeFeatures
from splitunet.filters.quantize_features import sender_encoding_bits
from splitunet.wire.codec import ENCODING_META_KEY, SENDER_ENCODED_META_KEY, EncodedLevel, decode_entry
from splitunet.wire.protocol import SITE_ERROR_HEADER, DataKind, MetaKey
from splitunet.wire.transport import features_to_dxo, register_tensor_support


def _released(chain, features, meta) -> bytes:
    """What leaves a site: the DXO of ``features`` through ``chain``, as FLARE serializes it."""
    register_tensor_support()
    shareable = features_to_dxo(features, DataKind.ACTIVATIONS, dict(meta)).to_shareable()
    for filter_ in chain:
        shareable = filter_.process(shareable, FLContext())
    return fobs.dumps(shareable)


@pytest.mark.parametrize("precision, bits, dtype", [("int8", 8, torch.float32), ("int4", 4, torch.float16)])
def test_sender_codes_leave_as_the_very_bytes_of_the_filter_path(features, precision, bits, dtype):
    features = {level: tensor.to(dtype) for level, tensor in features.items()}
    meta = {MetaKey.ITERATION: 3, MetaKey.SITE_COMPUTE_S: 0.25, MetaKey.PLAN: {"keys": ["k"], "size": [32] * 3}}
    dense = _released([QuantizeFeatures(precision), FeatureGuard()], features, meta)
    codes = {level: EncodedLevel.affine(tensor, bits) for level, tensor in features.items()}
    sent = _released([QuantizeFeatures(precision), FeatureGuard()], codes, meta)
    assert sent == dense
    dxo = from_shareable(fobs.loads(sent))
    assert SENDER_ENCODED_META_KEY not in dxo.meta
    trail = dxo.get_meta_prop(MetaKey.FILTER_TRAIL)
    assert trail[0]["levels"] == sorted(dxo.data) and trail[0]["bytes_in"] == sum(
        t.numel() * t.element_size() for t in features.values()
    )


def test_a_quantizer_of_other_bits_refuses_the_sender_codes(features):
    codes = {level: EncodedLevel.affine(tensor, 4) for level, tensor in features.items()}
    shareable = fobs.loads(_released([QuantizeFeatures("int8")], codes, {}))
    message = shareable.get_header(SITE_ERROR_HEADER)
    assert "QuantizeFeatures" in message and "encoded by the sender (affine, 4 bits)" in message and "int8" in message


def test_malformed_sender_codes_are_refused(features):
    codes = {level: EncodedLevel.affine(tensor, 8) for level, tensor in features.items()}
    codes[2] = EncodedLevel(codes[2].payload[:, :, :-1], codes[2].encoding)
    message = fobs.loads(_released([QuantizeFeatures("int8")], codes, {})).get_header(SITE_ERROR_HEADER)
    assert "x2 arrived with a malformed affine encoding: codes have shape" in message


def test_a_filter_that_needs_dense_features_refuses_sender_codes(features):
    codes = {level: EncodedLevel.affine(tensor, 8) for level, tensor in features.items()}
    message = fobs.loads(_released([ChannelDropout(0.5)], codes, {})).get_header(SITE_ERROR_HEADER)
    assert "ChannelDropout" in message and "already encoded" in message


def test_senders_encode_only_for_a_quantizer_first_on_every_level():
    assert sender_encoding_bits([QuantizeFeatures("int8"), FeatureGuard()]) == 8
    assert sender_encoding_bits([QuantizeFeatures("int2")]) == 2
    assert sender_encoding_bits([QuantizeFeatures("float16")]) is None
    assert sender_encoding_bits([QuantizeFeatures("int8", levels=[0, 1])]) is None
    assert sender_encoding_bits([QuantizeFeatures("int8", data_kinds=[DataKind.GRADIENTS])]) is None
    assert sender_encoding_bits([ChannelDropout(0.5), QuantizeFeatures("int8")]) is None
    assert sender_encoding_bits([FeatureGuard(), QuantizeFeatures("int8")]) is None
    assert sender_encoding_bits([]) is None


# ------------------------------------------------------------------------------------------ FeatureGuard on codes
def _guard_message(guard: FeatureGuard, payload: torch.Tensor, encoding: dict) -> str | None:
    register_tensor_support()
    dxo = DXO(DataKind.ACTIVATIONS, {"x0": payload}, {ENCODING_META_KEY: {"x0": encoding}})
    return guard.process(dxo.to_shareable(), FLContext()).get_header(SITE_ERROR_HEADER)


def _decoding_verdict(payload: torch.Tensor, encoding: dict, max_abs: float | None) -> str | None:
    """What the guard said when it decoded the level (its value checks, as they were)."""
    values = decode_entry(payload, encoding)
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        return f"x0 holds {bad} NaN/Inf values of {values.numel()}"
    if max_abs is not None and values.numel():
        largest = float(values.abs().max())
        if largest > max_abs:
            return f"x0 holds |value| {largest:.4g} > max_abs {max_abs:g}"
    return None


def _level_cases():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(2, 4, 6, 5, 7, generator=generator)
    one_inf, one_nan, minus_inf = base.clone(), base.clone(), base.clone()
    one_inf[1, 2, 0, 0, 0] = float("inf")
    one_nan[0, 3, 1, 1, 1] = float("nan")
    minus_inf[0, 0, 2, 2, 2] = -float("inf")
    return {
        "random": base,
        "scaled": base * 40,
        "constant": torch.full((1, 3, 4, 4, 4), 7.0),
        "inf": one_inf,
        "nan": one_nan,
        "-inf": minus_inf,
        "half": (base * 100).half(),
    }


LEVEL_CASES = _level_cases()


@pytest.mark.parametrize("max_abs", [None, 2.5, 1e4])
@pytest.mark.parametrize("bits", [8, 4, 1])
@pytest.mark.parametrize("case", sorted(LEVEL_CASES))
def test_guard_on_codes_says_what_it_said_after_decoding(case, bits, max_abs):
    encoded = EncodedLevel.affine(LEVEL_CASES[case], bits)
    expected = _decoding_verdict(encoded.payload, dict(encoded.encoding), max_abs)
    message = _guard_message(FeatureGuard(max_abs=max_abs), encoded.payload, dict(encoded.encoding))
    if expected is None:
        assert message is None
    else:
        assert message is not None and message.endswith(expected)


def test_values_that_overflow_their_dtype_are_counted_as_decoding_counted_them():
    # float16 tops out at 65504: codes above 55 decode to infinity once cast.
    payload = torch.arange(256, dtype=torch.uint8).reshape(1, 2, 128)
    encoding = {
        "scheme": "affine",
        "bits": 8,
        "dtype": "float16",
        "shape": [1, 2, 4, 4, 8],
        "low": torch.tensor([[60000.0, 0.0]]),
        "step": torch.tensor([[100.0, 1.0]]),
    }
    expected = _decoding_verdict(payload, encoding, None)
    assert expected is not None and _guard_message(FeatureGuard(), payload, encoding).endswith(expected)


def _valid():
    encoded = EncodedLevel.affine(LEVEL_CASES["random"], 8)
    return encoded.payload, dict(encoded.encoding)


@pytest.mark.parametrize(
    "name, change, expected",
    [
        ("codes of another dtype", lambda p, e: (p.to(torch.int16), e), "codes must be a uint8 tensor"),
        ("codes cut short", lambda p, e: (p[..., :-1], e), "codes have shape"),
        ("codes of a sample too many", lambda p, e: (torch.cat([p, p]), e), "codes have shape"),
        ("low missing", lambda p, e: (p, {k: v for k, v in e.items() if k != "low"}), "the encoding lacks 'low'"),
        ("low per sample only", lambda p, e: (p, {**e, "low": e["low"][:, :1]}), "low must be"),
        ("step as a list", lambda p, e: (p, {**e, "step": e["step"].tolist()}), "step must be"),
        ("negative step", lambda p, e: (p, {**e, "step": -e["step"]}), "a step is negative"),
        ("unknown bits", lambda p, e: (p, {**e, "bits": 3}), "bits must be one of"),
        ("unknown dtype", lambda p, e: (p, {**e, "dtype": "float7"}), "dtype 'float7' is not a torch dtype"),
    ],
)
def test_malformed_codes_and_scales_are_refused_without_decoding(name, change, expected):
    payload, encoding = change(*_valid())
    message = _guard_message(FeatureGuard(), payload, encoding)
    assert message is not None and f"x0 has a malformed affine encoding: {expected}" in message, name


def test_non_finite_scales_are_refused_as_the_values_they_spoil():
    payload, encoding = _valid()
    encoding["step"] = encoding["step"].clone()
    encoding["step"][1, 2] = float("nan")
    expected = _decoding_verdict(payload, encoding, None)
    assert _guard_message(FeatureGuard(), payload, encoding).endswith(expected)
    encoding["low"] = encoding["low"].clone()
    encoding["low"][0, 0] = float("inf")
    expected = _decoding_verdict(payload, encoding, None)
    assert _guard_message(FeatureGuard(), payload, encoding).endswith(expected)
