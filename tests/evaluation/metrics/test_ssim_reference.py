"""ssim_3d against an independent SSIM written from Wang et al. (IEEE TIP 2004) with numpy and scipy.

The reference shares only the definition with MONAI: an 11-tap Gaussian window (sigma 1.5) separable over the
three axes, local means, variances and covariance over the valid window positions, C1 = (0.01 L)^2 and
C2 = (0.03 L)^2 with L the original crop's range, the mean over positions; the intensity fit (least squares,
non-negative slope) is written out here too. Agreement to three decimals on crops that span the SSIM scale shows
the leakage tables report the SSIM they say.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d, gaussian_filter

from splitunet.evaluation.metrics import ssim_3d

WINDOW, SIGMA = 11, 1.5


def _window() -> np.ndarray:
    offsets = np.arange(WINDOW) - WINDOW // 2
    weights = np.exp(-(offsets**2) / (2 * SIGMA**2))
    return weights / weights.sum()


def _local_mean(volume: np.ndarray) -> np.ndarray:
    weights, half = _window(), WINDOW // 2
    for axis in range(3):
        volume = correlate1d(volume, weights, axis=axis, mode="constant")
    # Positions where the whole window lies inside the crop.
    return volume[half:-half, half:-half, half:-half]


def _aligned(reconstruction: np.ndarray, original: np.ndarray) -> np.ndarray:
    r, y = reconstruction.ravel(), original.ravel()
    design = np.stack([r - r.mean(), np.ones_like(r)], axis=1)
    (slope, offset), *_ = np.linalg.lstsq(design, y, rcond=None)
    return (max(slope, 0.0) * (reconstruction - r.mean()) + (offset if slope > 0 else y.mean())).astype(np.float64)


def reference_ssim(reconstruction: np.ndarray, original: np.ndarray) -> float:
    x, y = _aligned(reconstruction.astype(np.float64), original.astype(np.float64)), original.astype(np.float64)
    span = y.max() - y.min()
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
    mu_x, mu_y = _local_mean(x), _local_mean(y)
    var_x, var_y = _local_mean(x * x) - mu_x**2, _local_mean(y * y) - mu_y**2
    cov = _local_mean(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def _brainish(rng: np.random.Generator, shape=(24, 26, 22)) -> np.ndarray:
    """Smooth structure with edges: blurred blobs plus a bright sphere, like a tissue crop."""
    volume = gaussian_filter(rng.normal(size=shape), 2.0)
    grid = np.indices(shape).astype(float)
    centre = np.array(shape)[:, None, None, None] / 2
    volume += 1.5 * (np.sqrt(((grid - centre) ** 2).sum(0)) < 6)
    return volume


def _pairs():
    rng = np.random.default_rng(0)
    original = _brainish(rng)
    yield "identical", original, original
    yield "affine intensity change", original, 3.0 * original - 7.0
    yield "light noise", original, original + 0.1 * rng.normal(size=original.shape)
    yield "heavy noise", original, original + 1.0 * rng.normal(size=original.shape)
    yield "blurred", original, gaussian_filter(original, 1.5)
    yield "another crop", original, _brainish(rng)
    yield "inverted", original, -original


@pytest.mark.parametrize("name, original, reconstruction", list(_pairs()), ids=[p[0] for p in _pairs()])
def test_ssim_3d_matches_the_reference_to_three_decimals(name, original, reconstruction):
    as_tensor = lambda volume: torch.from_numpy(volume.astype(np.float32))[None, None]  # noqa: E731
    ours = float(ssim_3d(as_tensor(reconstruction), as_tensor(original))[0])
    assert ours == pytest.approx(reference_ssim(reconstruction, original), abs=5e-4), name


def test_the_reference_spans_the_scale():
    values = {name: reference_ssim(r, o) for name, o, r in _pairs()}
    assert values["identical"] == pytest.approx(1.0) and values["affine intensity change"] == pytest.approx(1.0)
    assert values["light noise"] > 0.9 > values["blurred"] > values["heavy noise"]
    # A negative slope gets no credit: the aligned image is the original's mean, structure-free.
    assert values["inverted"] < 0.05


def test_ssim_inside_a_mask_averages_only_the_windows_centred_there():
    rng = np.random.default_rng(1)
    original = _brainish(rng, shape=(36, 36, 36))
    as_tensor = lambda volume: torch.from_numpy(volume.astype(np.float32))[None, None]  # noqa: E731
    everywhere = torch.ones(1, 1, *original.shape)
    noisy = original + 0.5 * rng.normal(size=original.shape)
    assert float(ssim_3d(as_tensor(noisy), as_tensor(original), mask=everywhere)[0]) == pytest.approx(
        float(ssim_3d(as_tensor(noisy), as_tensor(original))[0]), abs=1e-5
    )
    # Noise only outside a central box: inside it the reconstruction is exact, away from the box's edge.
    box = np.zeros(original.shape, dtype=bool)
    box[6:-6, 6:-6, 6:-6] = True
    partly = np.where(box, original, noisy)
    inner = torch.zeros(1, 1, *original.shape)
    inner[0, 0, 11:-11, 11:-11, 11:-11] = 1.0  # windows reaching no noisy voxel (half width 5)
    masked = float(ssim_3d(as_tensor(partly), as_tensor(original), mask=inner, align=False)[0])
    assert masked == pytest.approx(1.0, abs=1e-5)
    assert float(ssim_3d(as_tensor(partly), as_tensor(original), align=False)[0]) < 0.9
