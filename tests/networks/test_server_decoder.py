"""ServerDecoder: fusion modes, skip subsets, odd sizes and clear errors."""

from __future__ import annotations

import pytest
import torch

from splitunet.networks import ServerDecoder, SiteEncoder

FEATURES = (4, 4, 8, 8, 16, 4)


def _features(num_sites, shape, levels):
    encoder = SiteEncoder(1, FEATURES)
    out = []
    for _ in range(num_sites):
        levels_out = encoder(torch.randn(1, 1, *shape))
        out.append({level: levels_out[level] for level in levels})
    return out


@pytest.mark.parametrize("fusion", ["concat", "mean"])
@pytest.mark.parametrize("skip_levels", [(0, 1, 2, 3), (1, 2, 3), (2,), ()])
@pytest.mark.parametrize("shape", [(32, 32, 32), (33, 34, 35)])
def test_output_shape(fusion, skip_levels, shape):
    decoder = ServerDecoder(3, FEATURES, skip_levels, fusion)
    logits = decoder(_features(3, shape, decoder.required_levels), spatial_size=shape)
    assert logits.shape == (1, 3, *shape)


def test_mean_fusion_tolerates_an_absent_site_and_concat_does_not():
    shape = (32, 32, 32)
    features = _features(3, shape, (0, 1, 2, 3, 4))
    features[1] = None
    assert ServerDecoder(3, FEATURES, fusion="mean")(features).shape == (1, 3, *shape)
    with pytest.raises(ValueError, match="absent site|sent no features"):
        ServerDecoder(3, FEATURES, fusion="concat")(features)


def test_concat_channels_scale_with_sites():
    assert ServerDecoder(4, FEATURES).level_channels == tuple(4 * f for f in FEATURES[:5])
    assert ServerDecoder(4, FEATURES, fusion="mean").level_channels == FEATURES[:5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_sites": 0}, "num_sites"),
        ({"num_sites": 2, "fusion": "sum"}, "fusion"),
        ({"num_sites": 2, "skip_levels": (4,)}, "skip_levels"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerDecoder(features=FEATURES, **kwargs)


def test_forward_errors_name_the_problem():
    decoder = ServerDecoder(2, FEATURES, skip_levels=(1, 2, 3))
    features = _features(2, (32, 32, 32), (1, 2, 3, 4))
    with pytest.raises(ValueError, match="expected features from 2 sites"):
        decoder(features[:1])
    missing = [dict(features[0]), features[1]]
    del missing[0][2]
    with pytest.raises(ValueError, match="did not send level x2"):
        decoder(missing)
    extra = [dict(features[0]), features[1]]
    extra[0][0] = torch.zeros(1, FEATURES[0], 32, 32, 32)
    with pytest.raises(ValueError, match="not configured for"):
        decoder(extra)
