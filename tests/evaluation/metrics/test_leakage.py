import math

import pytest
import torch
import torch.nn.functional as F

from splitunet.evaluation.metrics import image_leakage, mean_image_prior, relative_leakage


def _volumes(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shared = F.avg_pool3d(torch.randn(1, 1, 20, 20, 20, generator=generator), 5, 1, 2) * 3.0
    own = F.avg_pool3d(torch.randn(count, 1, 20, 20, 20, generator=generator), 3, 1, 1) * 2.0
    return shared + own  # a common anatomy plus individual detail


def test_mean_image_prior_is_the_voxelwise_mean():
    images = _volumes(4)
    prior = mean_image_prior(images)
    assert prior.shape == (1, 1, 20, 20, 20)
    torch.testing.assert_close(prior, images.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="non-empty"):
        mean_image_prior(images[:0])


def test_relative_leakage_of_the_prior_is_zero_and_grows_with_a_better_reconstruction():
    images = _volumes(5)
    original, prior = images[:1], mean_image_prior(images[1:])
    as_prior = image_leakage(prior, original, prior)
    assert as_prior["mean"]["relative_leakage"] == 0.0
    assert as_prior["relative_leakage"] == [0.0]
    perfect = image_leakage(original, original, prior)["mean"]
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-5) and math.isinf(perfect["psnr"])
    assert perfect["relative_leakage"] > 0
    halfway = image_leakage((original + prior) / 2, original, prior)["mean"]
    assert 0 < halfway["relative_leakage"] < perfect["relative_leakage"]
    assert perfect["ssim_brain"] == pytest.approx(1.0, abs=1e-5)


def test_an_attack_worse_than_the_prior_is_reported_at_the_prior():
    images = _volumes(5)
    original, prior = images[:1], mean_image_prior(images[1:])
    unrelated = torch.randn_like(original)
    result = image_leakage(unrelated, original, prior)["mean"]
    assert result["ssim"] < result["ssim_prior"]
    assert result["ssim_reported"] == result["ssim_prior"] and result["relative_leakage"] < 0


def test_relative_leakage_formula_and_undefined_baseline():
    assert relative_leakage(0.6, 0.3) == pytest.approx(1.0)
    assert relative_leakage(0.15, 0.3) == pytest.approx(-0.5)
    assert math.isnan(relative_leakage(0.5, 0.0))
    assert math.isnan(relative_leakage(0.5, -0.1))


def test_a_batch_is_scored_per_sample_against_one_prior():
    images = _volumes(6)
    originals, prior = images[:2], mean_image_prior(images[2:])
    result = image_leakage(originals, originals, prior)
    assert len(result["ssim"]) == len(result["ssim_prior"]) == 2
    with pytest.raises(ValueError, match="prior"):
        image_leakage(originals, originals, images[2:5])
