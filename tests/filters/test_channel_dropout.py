import pytest
import torch

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import ChannelDropout
from splitunet.wire.protocol import DataKind, MetaKey
from splitunet.wire.transport import dxo_to_features


def test_channel_mode_zeroes_whole_channels_at_the_rate_and_rescales_the_rest(run_filter, make_features):
    rate = 0.3
    features = make_features(batch=8, size=16, channels=(64, 64, 64, 64, 64))
    _, dxo = run_filter(ChannelDropout(rate=rate, seed=0), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    dropped = total = 0
    for level, tensor in out.items():
        flat = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
        zero_channels = (flat == 0).all(dim=-1)
        dropped += int(zero_channels.sum())
        total += zero_channels.numel()
        kept = ~zero_channels
        original = features[level].reshape(flat.shape)
        torch.testing.assert_close(flat[kept], original[kept] / (1 - rate))
    # 2560 Bernoulli(0.3) draws: 4 standard deviations is about 0.036.
    assert dropped / total == pytest.approx(rate, abs=0.04)


def test_element_mode_keeps_the_expectation(run_filter, make_features):
    features = {0: torch.ones(4, 8, 16, 16, 16)}
    _, dxo = run_filter(ChannelDropout(rate=0.5, mode="element", seed=0), features)
    out = dxo.data["x0"]
    assert (out == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)


def test_rate_zero_is_the_identity_and_trail_reports_settings(run_filter, features):
    _, dxo = run_filter(ChannelDropout(rate=0.0), features)
    for level, tensor in dxo_to_features(dxo, DataKind.ACTIVATIONS).items():
        torch.testing.assert_close(tensor, features[level])
    record = dxo.get_meta_prop(MetaKey.FILTER_TRAIL)[-1]
    assert record["filter"] == "ChannelDropout" and record["rate"] == 0.0 and record["mode"] == "channel"


@pytest.mark.parametrize("kwargs", [{"rate": 1.0}, {"rate": -0.1}, {"rate": 0.5, "mode": "voxel"}])
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(SplitUNetConfigError):
        ChannelDropout(**kwargs)
