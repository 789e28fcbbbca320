import pytest
import torch

from splitunet.evaluation.attacks import feature_matching_loss, total_variation_3d


def test_total_variation_of_a_constant_is_zero_and_of_a_ramp_is_its_slope():
    assert total_variation_3d(torch.full((1, 1, 5, 6, 7), 3.0)).item() == 0.0
    ramp = torch.arange(6, dtype=torch.float32).reshape(1, 1, 1, 1, 6).expand(2, 1, 4, 5, 6)
    assert total_variation_3d(2 * ramp).item() == pytest.approx(2.0)  # only W varies, by 2 per voxel
    # Mean, not sum: the same pattern on a bigger crop gives the same value.
    checker = (torch.arange(8)[:, None, None] + torch.arange(8)[None, :, None] + torch.arange(8)[None, None]) % 2
    small, big = checker[None, None].float(), checker.repeat(2, 2, 2)[None, None].float()
    assert total_variation_3d(small).item() == pytest.approx(total_variation_3d(big).item())


def test_total_variation_needs_a_volume_batch():
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        total_variation_3d(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="spatial sizes >= 2"):
        total_variation_3d(torch.zeros(1, 1, 1, 4, 4))


def test_feature_matching_loss_is_scale_free_per_level_and_one_for_zeros():
    generator = torch.Generator().manual_seed(0)
    observed = {0: torch.randn(1, 2, 4, 4, 4, generator=generator), 3: 100 * torch.randn(1, 4, 2, 2, 2)}
    assert feature_matching_loss(observed, observed).item() == 0.0
    zeros = {level: torch.zeros_like(t) for level, t in observed.items()}
    assert feature_matching_loss(zeros, observed).item() == pytest.approx(2.0)  # 1 per level, whatever the scale
