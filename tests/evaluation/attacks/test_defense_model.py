"""The attacker's reading of the filter trail, and its simulation of the defense against the real filters."""

import math

import pytest
import torch
from attack_setup import run_filters

from splitunet.evaluation.attacks import DefenseModel, average_releases, defense_from_trail, simulate_defense
from splitunet.evaluation.attacks.defense_model import observed_keep_mask, quantization_bounds
from splitunet.filters import BlockSkipLevels, ChannelDropout, ClippedGaussianNoise, QuantizeFeatures, TopKSparsify


@pytest.fixture(scope="module")
def features():
    generator = torch.Generator().manual_seed(0)
    return {0: torch.randn(2, 8, 8, 8, 8, generator=generator), 1: torch.randn(2, 16, 4, 4, 4, generator=generator)}


def test_trail_of_a_real_chain_is_read_in_order(features):
    chain = [
        BlockSkipLevels([0]),
        ChannelDropout(0.25, seed=0),
        ClippedGaussianNoise(clip_rms=1.0, noise_multiplier=0.01, seed=0),
        QuantizeFeatures("int4"),
    ]
    _, trail = run_filters(chain, features)
    trail = [{"filter": "FeatureGuard", "party": "site-1", "call": 1}, *trail, {"filter": "MyOwnFilter"}]
    defense = defense_from_trail(trail)
    assert [step.filter for step in defense.steps] == [
        "BlockSkipLevels",
        "ChannelDropout",
        "ClippedGaussianNoise",
        "QuantizeFeatures",
    ]
    assert defense.withheld() == (0,)
    assert defense.dropout(1) == (0.25, "channel") and defense.dropout(0) is None
    clip, std = defense.noise(1)
    assert clip == pytest.approx(math.sqrt(16 * 4**3)) and std == pytest.approx(0.01 * clip)
    assert defense.precision(1) == "int4" and defense.top_k(1) is None
    assert defense.unknown == ("MyOwnFilter",)  # named, not guessed
    assert not defense.is_empty and defense_from_trail([]).is_empty and defense_from_trail(None).is_empty
    assert any("ChannelDropout" in line for line in defense.describe())


def test_top_k_and_quantization_simulations_equal_the_real_filters(features):
    for one in (TopKSparsify(0.1), QuantizeFeatures("int2"), QuantizeFeatures("float16")):
        received, trail = run_filters([one], features)
        simulated = simulate_defense(features, defense_from_trail(trail), torch.Generator().manual_seed(5))
        for level in features:
            assert torch.equal(simulated[level], received[level].float()), (type(one).__name__, level)


def test_dropout_simulation_has_the_filters_statistics(features):
    big = {0: torch.rand(64, 32, 2, 2, 2) + 0.5}  # positive: a zero channel can only be a dropped one
    received, trail = run_filters([ChannelDropout(0.5, seed=3)], big)
    simulated = simulate_defense(big, defense_from_trail(trail), torch.Generator().manual_seed(4))[0]
    for observed in (received[0], simulated):
        kept = observed_keep_mask(observed, defense_from_trail(trail), 0)
        assert kept.shape == (64, 32, 1, 1, 1)
        assert kept.float().mean().item() == pytest.approx(0.5, abs=0.05)  # 2048 channels: std 0.011
        ratio = observed / big[0]
        assert torch.allclose(ratio[kept.expand_as(ratio)], torch.tensor(2.0))  # the 1 / (1 - rate) rescale
    assert not torch.equal(received[0], simulated)  # the attacker's own draws, not the site's


def test_noise_simulation_has_the_filters_std_and_clip(features):
    received, trail = run_filters([ClippedGaussianNoise(clip_norm={"x0": 5.0}, noise_multiplier=0.1, seed=0)], features)
    defense = defense_from_trail(trail)
    simulated = simulate_defense(features, defense, torch.Generator().manual_seed(1))
    assert torch.equal(simulated[1], features[1])  # the filter noised x0 only
    clipped = features[0] * (5.0 / features[0].flatten(1).norm(dim=1)).clamp(max=1)[:, None, None, None, None]
    for observed in (received[0], simulated[0]):
        assert (observed - clipped).std().item() == pytest.approx(0.5, rel=0.05)  # 8192 values per level


def test_quantization_bounds_hold_the_original_values(features):
    for precision in ("int1", "int2", "int8"):
        received, trail = run_filters([QuantizeFeatures(precision)], features)
        lower, upper = quantization_bounds(received[0], precision)
        assert (lower <= features[0] + 1e-5).all() and (features[0] <= upper + 1e-5).all(), precision
        assert (upper - lower).max() > 0
    assert quantization_bounds(received[0], "float16") is None


def test_averaging_releases_shrinks_the_noise(features):
    filt = ClippedGaussianNoise(clip_norm={"x0": 1e3}, noise_multiplier=1e-3, seed=0)
    releases = [run_filters([filt], features) for _ in range(4)]
    defense = defense_from_trail(releases[0][1])
    averaged, after = average_releases([observed for observed, _ in releases], defense)
    single = (releases[0][0][0] - features[0]).std().item()
    assert single == pytest.approx(1.0, rel=0.05)
    assert (averaged[0] - features[0]).std().item() == pytest.approx(single / 2, rel=0.1)
    assert after.releases == 4 and after.noise(0)[1] == pytest.approx(defense.noise(0)[1] / 2)


def test_averaging_with_dropout_skips_the_dropped_channels(features):
    positive = {0: features[0].abs() + 0.1}
    dropout = ChannelDropout(0.5, seed=0)
    releases = [run_filters([dropout], positive) for _ in range(6)]
    averaged, _ = average_releases([observed for observed, _ in releases], defense_from_trail(releases[0][1]))
    seen = torch.stack([observed[0].flatten(2).amax(2) > 0 for observed, _ in releases]).any(0)
    # Kept values are 2x the clean ones in every release that kept them; never-kept channels stay 0.
    assert torch.allclose(averaged[0][seen], 2 * positive[0][seen])
    assert (averaged[0][~seen] == 0).all()


def test_no_defense_simulates_to_the_same_features(features):
    assert simulate_defense(features, DefenseModel(), torch.Generator()) == features
    with pytest.raises(ValueError, match="at least one"):
        average_releases([], DefenseModel())
