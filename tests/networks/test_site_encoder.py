"""SiteEncoder: BasicUNet's encoder, level shapes and weight compatibility."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet

from splitunet.networks import SiteEncoder

CASES = [
    ((16, 16, 32, 64, 128, 16), (32, 32, 32)),
    ((4, 4, 8, 8, 16), (33, 34, 35)),
    ((8, 16, 32, 64, 128, 8), (48, 40, 32)),
]


@pytest.mark.parametrize("features, shape", CASES)
def test_levels_have_expected_shapes(features, shape):
    encoder = SiteEncoder(in_channels=1, features=features)
    levels = encoder(torch.randn(2, 1, *shape))
    assert len(levels) == 5
    size = list(shape)
    for level, tensor in enumerate(levels):
        assert tensor.shape == (2, features[level], *size)
        size = [s // 2 for s in size]


def test_basicunet_encoder_weights_load_and_match():
    torch.manual_seed(0)
    unet = BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 16, 4))
    encoder = SiteEncoder(1, (4, 4, 8, 8, 16, 4))
    encoder_keys = set(encoder.state_dict())
    encoder.load_state_dict({k: v for k, v in unet.state_dict().items() if k in encoder_keys})
    x = torch.randn(1, 1, 32, 32, 32)
    x0 = unet.conv_0(x)
    x1 = unet.down_1(x0)
    x2 = unet.down_2(x1)
    x3 = unet.down_3(x2)
    x4 = unet.down_4(x3)
    for ours, reference in zip(encoder(x), (x0, x1, x2, x3, x4)):
        torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("kwargs", [{"in_channels": 0}, {"features": (4, 4, 8)}])
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        SiteEncoder(**kwargs)
