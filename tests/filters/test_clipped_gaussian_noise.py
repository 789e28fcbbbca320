import math

import pytest
import torch

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import ClippedGaussianNoise
from splitunet.filters.accounting import effective_noise_multiplier, gaussian_epsilon
from splitunet.filters.clipped_gaussian_noise import clip_and_noise
from splitunet.wire.protocol import DataKind, MetaKey
from splitunet.wire.transport import dxo_to_features


def test_without_noise_every_sample_level_is_clipped_to_c_and_small_ones_are_unchanged(run_filter, make_features):
    features = make_features()
    features[1][0] *= 1e-4  # one sample-level far below C stays as it is
    _, dxo = run_filter(ClippedGaussianNoise(clip_norm=5.0, noise_multiplier=0.0, seed=0), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    for level, tensor in out.items():
        norms = tensor.reshape(tensor.shape[0], -1).norm(dim=1)
        assert torch.all(norms <= 5.0 * (1 + 1e-5)), level
    torch.testing.assert_close(out[1][0], features[1][0])
    # Large samples keep their direction.
    cosine = torch.nn.functional.cosine_similarity(out[0][1].flatten(), features[0][1].flatten(), dim=0)
    assert cosine > 0.9999


def test_noise_after_clipping_has_std_sigma_times_c(run_filter, make_features):
    features = make_features(batch=2, size=32)
    clip_norm, sigma = 2.0, 1.5
    _, dxo = run_filter(ClippedGaussianNoise(clip_norm=clip_norm, noise_multiplier=sigma, seed=1), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    clipped, _ = clip_and_noise(features[0], clip_norm, 0.0, torch.Generator())
    residual = out[0] - clipped
    # 2 * 8 * 32^3 samples: the std estimate is within a percent or two of sigma * C.
    assert residual.std().item() == pytest.approx(sigma * clip_norm, rel=0.02)
    assert abs(residual.mean().item()) < 0.02 * sigma * clip_norm


def test_noise_differs_between_releases_and_filters(make_features):
    features = make_features()
    first, _ = clip_and_noise(features[0], 1.0, 1.0, ClippedGaussianNoise(1.0, 1.0).generator)
    second, _ = clip_and_noise(features[0], 1.0, 1.0, ClippedGaussianNoise(1.0, 1.0).generator)
    assert not torch.allclose(first, second)


def test_epsilon_decreases_with_sigma_and_grows_with_releases():
    sigmas = [0.5, 1.0, 2.0, 4.0, 8.0]
    per_release = [ClippedGaussianNoise(1.0, s).epsilon(num_levels=5) for s in sigmas]
    assert all(a > b for a, b in zip(per_release, per_release[1:]))
    noise = ClippedGaussianNoise(1.0, 2.0)
    composed = [noise.epsilon(num_levels=5, releases=r) for r in (1, 10, 100)]
    assert composed[0] < composed[1] < composed[2]
    # Subsampling amplifies privacy.
    assert ClippedGaussianNoise(1.0, 2.0, sample_rate=0.1).epsilon(5, 100) < composed[2]
    assert gaussian_epsilon(0.0, 1, 1e-5) == math.inf


def test_effective_noise_multiplier_accounts_for_levels_and_replacement():
    # sensitivity 2C per level, sqrt(L) levels
    assert effective_noise_multiplier(4.0, 4) == pytest.approx(1.0)


def test_reports_epsilon_and_counts_releases_in_the_dxo_trail(run_filter, features):
    noise = ClippedGaussianNoise(clip_norm=1.0, noise_multiplier=1.0, delta=1e-6, seed=0)
    records = [run_filter(noise, features)[1].get_meta_prop(MetaKey.FILTER_TRAIL)[-1] for _ in range(3)]
    assert [r["call"] for r in records] == [1, 2, 3]
    assert [r["releases"] for r in records] == [1, 2, 3]
    assert records[0]["epsilon_per_release"] == pytest.approx(noise.epsilon(len(features), 1))
    assert records[2]["epsilon_composed"] > records[0]["epsilon_composed"]
    assert records[0]["noise_std"]["x0"] == 1.0 and records[0]["delta"] == 1e-6


def test_only_chosen_levels_are_noised(run_filter, features):
    _, dxo = run_filter(ClippedGaussianNoise(clip_norm=1.0, noise_multiplier=3.0, levels=[0], seed=0), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    assert not torch.allclose(out[0], features[0])
    for level in (1, 2, 3, 4):
        torch.testing.assert_close(out[level], features[level])


def test_keeps_float16(run_filter, features):
    half = {level: t.half() for level, t in features.items()}
    _, dxo = run_filter(ClippedGaussianNoise(clip_norm=1.0, noise_multiplier=1.0, seed=0), half)
    assert all(t.dtype == torch.float16 for t in dxo.data.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0, "noise_multiplier": 1},
        {"clip_rms": -1.0, "noise_multiplier": 1},
        {"clip_norm": 1, "noise_multiplier": -1},
        {"clip_norm": 1, "noise_multiplier": 1, "delta": 1.0},
        {"clip_norm": 1, "noise_multiplier": 1, "sample_rate": 0},
        {"clip_norm": 1, "noise_multiplier": 1, "levels": [7]},
        {"clip_norm": 1, "noise_multiplier": 1, "data_kinds": ["WEIGHTS"]},
    ],
)
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(SplitUNetConfigError):
        ClippedGaussianNoise(**kwargs)


def test_a_bound_per_level_chooses_the_levels_and_clips_each_to_its_own(run_filter, make_features):
    features = make_features()
    bounds = {"x0": 3.0, "x4": 0.5}
    _, dxo = run_filter(ClippedGaussianNoise(clip_norm=bounds, noise_multiplier=0.0), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    for key, bound in bounds.items():
        norms = out[int(key[1])].reshape(2, -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full((2,), bound))
    torch.testing.assert_close(out[2], features[2])
    with pytest.raises(SplitUNetConfigError, match="not both"):
        ClippedGaussianNoise(clip_norm=bounds, noise_multiplier=1.0, levels=[0])
    with pytest.raises(SplitUNetConfigError, match="level keys"):
        ClippedGaussianNoise(clip_norm={"skip0": 1.0}, noise_multiplier=1.0)


def test_an_rms_bound_scales_with_the_size_of_each_level(run_filter, features):
    _, dxo = run_filter(ClippedGaussianNoise(clip_rms=0.1, noise_multiplier=0.0), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    for tensor in out.values():
        rms = tensor.reshape(tensor.shape[0], -1).pow(2).mean(dim=1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 0.1))
    record = dxo.get_meta_prop(MetaKey.FILTER_TRAIL)[-1]
    assert record["clip_norm"]["x0"] == pytest.approx(0.1 * math.sqrt(8 * 32**3))
    with pytest.raises(SplitUNetConfigError, match="exactly one"):
        ClippedGaussianNoise(clip_norm=1.0, clip_rms=1.0, noise_multiplier=1.0)
    with pytest.raises(SplitUNetConfigError, match="exactly one"):
        ClippedGaussianNoise(noise_multiplier=1.0)
