"""minimum_defense: a site's floor against the filter chain a job would run on what the site releases."""

from __future__ import annotations

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import (
    BlockSkipLevels,
    ChannelDropout,
    ClippedGaussianNoise,
    FeatureGuard,
    QuantizeFeatures,
    TopKSparsify,
)
from splitunet.site.minimum_defense import describe_chain, parse_minimum_defense, shortfalls

NOISE = {"ClippedGaussianNoise": {"noise_multiplier": 0.5}}


def test_a_chain_with_the_required_filter_at_least_as_strong_meets_the_minimum():
    chain = [ClippedGaussianNoise(clip_rms=1.0, noise_multiplier=0.5), QuantizeFeatures("int8"), FeatureGuard()]
    assert shortfalls(NOISE, chain) == []
    assert shortfalls(NOISE, [ClippedGaussianNoise(clip_rms=1.0, noise_multiplier=2.0)]) == []


def test_a_missing_or_weaker_filter_is_named_with_what_it_lacks():
    (missing,) = shortfalls(NOISE, [QuantizeFeatures("int8"), FeatureGuard()])
    assert missing == "ClippedGaussianNoise(noise_multiplier >= 0.5): not in the chain"
    (weaker,) = shortfalls(NOISE, [ClippedGaussianNoise(clip_rms=1.0, noise_multiplier=0.1)])
    assert "noise_multiplier 0.1 (needs >= 0.5)" in weaker


def test_smaller_is_stronger_for_clip_norms_fractions_and_bits():
    assert shortfalls({"TopKSparsify": {"fraction": 0.1}}, [TopKSparsify(fraction=0.05)]) == []
    assert shortfalls({"TopKSparsify": {"fraction": 0.1}}, [TopKSparsify(fraction=0.2)])
    assert shortfalls({"QuantizeFeatures": {"bits": 8}}, [QuantizeFeatures("int4")]) == []
    assert shortfalls({"QuantizeFeatures": {"bits": 8}}, [QuantizeFeatures("float16")])  # no bits: not a floor
    noise = {"ClippedGaussianNoise": {"clip_norm": 2.0, "noise_multiplier": 1.0}}
    assert shortfalls(noise, [ClippedGaussianNoise(clip_norm=1.0, noise_multiplier=1.0)]) == []
    assert shortfalls(noise, [ClippedGaussianNoise(clip_norm=4.0, noise_multiplier=1.0)])


def test_level_lists_must_be_covered_and_a_filter_on_every_level_covers_any():
    minimum = {"BlockSkipLevels": {"levels": [0]}}
    assert shortfalls(minimum, [BlockSkipLevels(levels=[0, 1])]) == []
    assert shortfalls(minimum, [BlockSkipLevels(levels=[1])])
    assert shortfalls({"ChannelDropout": {"levels": [0, 1], "rate": 0.25}}, [ChannelDropout(rate=0.5)]) == []


def test_every_required_filter_counts_and_any_matching_instance_will_do():
    minimum = {**NOISE, "BlockSkipLevels": {"levels": [0]}}
    weak, strong = (
        ClippedGaussianNoise(clip_rms=1.0, noise_multiplier=0.1),
        ClippedGaussianNoise(clip_rms=1.0, noise_multiplier=1.0),
    )
    assert shortfalls(minimum, [weak, strong, BlockSkipLevels(levels=[0])]) == []
    assert [s.split("(")[0] for s in shortfalls(minimum, [weak])] == ["ClippedGaussianNoise", "BlockSkipLevels"]
    assert describe_chain([weak, FeatureGuard()]) == "ClippedGaussianNoise, FeatureGuard"
    assert describe_chain([]) == "no filter"


@pytest.mark.parametrize("bad", [["ClippedGaussianNoise"], {"ClippedGaussianNoise": 0.5}, "noise"])
def test_a_malformed_minimum_is_refused_naming_its_file(bad):
    with pytest.raises(SplitUNetConfigError, match="local/privacy.json: splitunet_minimum_defense must map"):
        parse_minimum_defense(bad, "local/privacy.json")


def test_the_model_settings_entry_binds_the_job_not_the_chain():
    from splitunet.site.minimum_defense import model_shortfalls
    from splitunet.wire.model_config import SplitModelConfig

    minimum = parse_minimum_defense({"SplitModelConfig": {"train_encoders": False}}, "privacy.json")
    assert shortfalls(minimum, []) == []  # not a filter: the chain check leaves it alone
    assert model_shortfalls(minimum, SplitModelConfig(train_encoders=False)) == []
    assert model_shortfalls(minimum, SplitModelConfig()) == ["SplitModelConfig train_encoders True (needs = False)"]
    assert model_shortfalls({"BlockSkipLevels": {}}, SplitModelConfig()) == []
