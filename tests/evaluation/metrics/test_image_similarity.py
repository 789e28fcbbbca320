import math

import pytest
import torch
import torch.nn.functional as F

from splitunet.evaluation.metrics import align_intensity, data_range, psnr_3d, ssim_3d


def _volume(batch: int = 1, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Smooth random volumes ``(B, 1, size, size, size)``: image-like structure at a few voxels."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, size, size, size, generator=generator)
    return F.avg_pool3d(noise, kernel_size=5, stride=1, padding=2) * 3.0


def _noisy(image: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return image + std * torch.randn(image.shape, generator=generator)


def test_ssim_of_an_image_with_itself_is_one_and_falls_monotonically_with_noise():
    image = _volume(batch=2)
    assert torch.allclose(ssim_3d(image, image), torch.ones(2), atol=1e-5)
    stds = [0.05, 0.2, 0.5, 1.0, 2.0]
    values = [ssim_3d(_noisy(image, std), image).mean().item() for std in stds]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[0] < 1.0 and values[-1] < 0.5


def test_alignment_forgives_a_positive_affine_map_but_not_an_inversion():
    image = _volume()
    rescaled = 0.1 * image - 3.0
    assert ssim_3d(rescaled, image).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim_3d(rescaled, image, align=False).item() < 0.5
    # An inverted image gets slope 0: a constant at the original's mean, whose SSIM is far below 1.
    inverted = align_intensity(-image, image)
    torch.testing.assert_close(inverted, torch.full_like(image, image.mean().item()))
    assert ssim_3d(-image, image).item() < 0.1


def test_data_range_is_the_originals_spread():
    image = _volume(batch=2)
    torch.testing.assert_close(data_range(image), image.flatten(1).amax(1) - image.flatten(1).amin(1))
    assert data_range(torch.zeros(1, 1, 12, 12, 12)).item() == 1.0


def test_psnr_is_infinite_for_equal_images_finite_otherwise_and_falls_with_noise():
    image = _volume()
    assert math.isinf(psnr_3d(image, image).item())
    assert math.isinf(psnr_3d(image, image, align=False).item())
    # A constant guess of a structured crop is finite; so is any reconstruction of a constant crop but itself.
    assert math.isfinite(psnr_3d(torch.zeros_like(image), image).item())
    values = [psnr_3d(_noisy(image, std), image).item() for std in (0.1, 0.5, 1.0)]
    assert all(math.isfinite(v) for v in values)
    assert values[0] > values[1] > values[2]
    # Without alignment, PSNR equals 20 log10(range) - 10 log10(MSE).
    noisy = _noisy(image, 0.5)
    mse = (noisy - image).pow(2).mean()
    expected = 20 * math.log10(data_range(image).item()) - 10 * math.log10(mse.item())
    assert psnr_3d(noisy, image, align=False).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "reconstruction, original, message",
    [
        (torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 15), "differ in shape"),
        (torch.zeros(1, 2, 16, 16, 16), torch.zeros(1, 2, 16, 16, 16), r"\(B, 1, D, H, W\)"),
        (torch.zeros(16, 16, 16), torch.zeros(16, 16, 16), r"\(B, 1, D, H, W\)"),
        (torch.zeros(1, 1, 10, 16, 16), torch.zeros(1, 1, 10, 16, 16), "at least 11"),
    ],
)
def test_bad_inputs_are_refused(reconstruction, original, message):
    with pytest.raises(ValueError, match=message):
        ssim_3d(reconstruction, original)
