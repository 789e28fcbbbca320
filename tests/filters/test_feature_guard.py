import pytest
import torch

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import FeatureGuard, QuantizeFeatures, TopKSparsify
from splitunet.wire.protocol import SITE_ERROR_HEADER, DataKind


def _rejection(run_filter, guard, features, kind=DataKind.ACTIVATIONS):
    shareable, _ = run_filter(guard, features, kind=kind)
    return shareable.get_header(SITE_ERROR_HEADER)


def test_good_features_pass_unchanged(run_filter, features):
    shareable, dxo = run_filter(FeatureGuard(expected_channels=[8, 16, 32, 64, 128]), features)
    assert shareable.get_header(SITE_ERROR_HEADER) is None
    for key, tensor in dxo.data.items():
        assert tensor.equal(features[int(key[1])])


def test_encoded_features_are_checked_after_decoding(run_filter, features, through_fobs):
    from nvflare.apis.fl_context import FLContext

    for encoder in (QuantizeFeatures("int4"), TopKSparsify(0.2)):
        encoded, _ = run_filter(encoder, features)
        checked = through_fobs(FeatureGuard().process(encoded, FLContext()))
        assert checked.get_header(SITE_ERROR_HEADER) is None


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected_naming_the_level(run_filter, features, bad_value):
    features[2][1, 3, 0, 0, 0] = bad_value
    message = _rejection(run_filter, FeatureGuard(), features, kind=DataKind.GRADIENTS)
    assert "FeatureGuard" in message and "x2 holds 1 NaN/Inf" in message


def test_wrong_dtype_shape_pyramid_and_size_are_rejected(run_filter, features):
    doubles = {level: t.double() for level, t in features.items()}
    assert "dtype float64" in _rejection(run_filter, FeatureGuard(), doubles)
    flat = dict(features)
    flat[3] = flat[3][0]
    assert "x3 has shape (64, 4, 4, 4)" in _rejection(run_filter, FeatureGuard(), flat)
    broken = dict(features)
    broken[1] = torch.zeros(2, 16, 15, 16, 16)
    assert "x1 has spatial size (15, 16, 16)" in _rejection(run_filter, FeatureGuard(), broken)
    batch = dict(features)
    batch[4] = torch.zeros(3, 128, 2, 2, 2)
    assert "batch size" in _rejection(run_filter, FeatureGuard(), batch)
    assert "exceed max_bytes" in _rejection(run_filter, FeatureGuard(max_bytes=1000), features)
    assert "max_abs" in _rejection(run_filter, FeatureGuard(max_abs=1.0), features)
    assert "channels" in _rejection(run_filter, FeatureGuard(expected_channels=[4, 16, 32, 64, 128]), features)


def test_odd_sizes_halve_by_floor(run_filter):
    odd = {0: torch.zeros(1, 2, 33, 34, 35), 1: torch.zeros(1, 2, 16, 17, 17), 4: torch.zeros(1, 2, 2, 2, 2)}
    shareable, _ = run_filter(FeatureGuard(), odd)
    assert shareable.get_header(SITE_ERROR_HEADER) is None


@pytest.mark.parametrize("kwargs", [{"max_bytes": 0}, {"max_abs": -1}, {"allowed_dtypes": ["int8"]}])
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(SplitUNetConfigError):
        FeatureGuard(**kwargs)
