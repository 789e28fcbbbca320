"""Image similarity of reconstructions: 3D SSIM and PSNR after the only intensity fit the attacks allow.

How the comparison is made (the same for every reconstruction and for the prior):

1. **Intensity alignment.** The site encoder's instance normalisation makes its features (nearly) blind to a
   positive affine change ``a * x + b`` of the input intensities, so no attack can recover absolute intensity.
   Each reconstruction is mapped by the least-squares ``a * r + b`` onto the original crop, with ``a >= 0``
   (:func:`align_intensity`): two numbers per crop, and an inverted reconstruction gets no credit (``a = 0``
   leaves a constant image).
2. **Data range.** ``data_range = max(original) - min(original)`` of each original crop, in the site's
   intensity normalisation (per-volume z-score over the brain). It sets SSIM's constants
   ``C1 = (0.01 * range)^2``, ``C2 = (0.03 * range)^2`` and PSNR's peak.
3. **SSIM** is MONAI's ``SSIMMetric(spatial_dims=3)`` with its defaults (Gaussian window 11, sigma 1.5; Wang et
   al., IEEE TIP 2004), averaged over the valid window positions; crops must be at least 11 voxels per axis.
   **PSNR** is MONAI's ``PSNRMetric(max_val=range)``: ``inf`` when the aligned reconstruction equals the crop.
"""

from __future__ import annotations

import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs

__all__ = ["align_intensity", "data_range", "ssim_3d", "psnr_3d", "brain_mask", "SSIM_WINDOW"]

# MONAI SSIMMetric's default window size and Gaussian sigma: crops smaller than the window cannot be scored.
SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def _check_pair(reconstruction: torch.Tensor, original: torch.Tensor) -> None:
    for name, tensor in (("reconstruction", reconstruction), ("original", original)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 5 or tensor.shape[1] != 1:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a (B, 1, D, H, W) tensor, got {shape}")
    if reconstruction.shape != original.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and original {tuple(original.shape)} differ in shape"
        )
    if min(original.shape[2:]) < SSIM_WINDOW:
        raise ValueError(
            f"crops must be at least {SSIM_WINDOW} voxels per axis for 3D SSIM, got {tuple(original.shape)}"
        )


def align_intensity(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Least-squares ``a * reconstruction + b`` closest to ``original`` per sample, with ``a >= 0``.

    Args:
        reconstruction, original: ``(B, 1, D, H, W)``.

    Returns:
        aligned reconstruction ``(B, 1, D, H, W)`` (float32).
    """
    _check_pair(reconstruction, original)
    # float64, so that a reconstruction equal to the original comes back bit-identical (PSNR inf, SSIM 1).
    r = reconstruction.detach().double().flatten(1)
    y = original.detach().double().flatten(1)
    r_centred = r - r.mean(1, keepdim=True)
    y_mean = y.mean(1, keepdim=True)
    slope = (r_centred * (y - y_mean)).sum(1, keepdim=True) / r_centred.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
    return (slope.clamp_min(0.0) * r_centred + y_mean).reshape(reconstruction.shape).float()


def data_range(original: torch.Tensor) -> torch.Tensor:
    """``max - min`` of each original crop ``(B, 1, D, H, W)`` -> ``(B,)``; a constant crop gets 1."""
    flat = original.detach().float().flatten(1)
    spread = flat.max(1).values - flat.min(1).values
    return torch.where(spread > 0, spread, torch.ones_like(spread))


def ssim_3d(
    reconstruction: torch.Tensor, original: torch.Tensor, align: bool = True, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """3D SSIM per sample (MONAI ``SSIMMetric``), after :func:`align_intensity` unless ``align`` is False.

    Args:
        reconstruction, original: ``(B, 1, D, H, W)``, each spatial size >= 11.
        align: fit the positive affine intensity map first (see the module notes).
        mask: ``(B, 1, D, H, W)`` in {0, 1}, e.g. the brain (:func:`brain_mask`): average the SSIM map only over
            the window positions whose centre voxel is in the mask, so that an easy background does not lift the
            score. ``None``: every valid position, as ``SSIMMetric``.

    Returns:
        ``(B,)`` SSIM values (1 for identical crops; NaN for a sample whose mask covers no valid position).
    """
    _check_pair(reconstruction, original)
    candidate = align_intensity(reconstruction, original) if align else reconstruction.detach().float()
    values = []
    for index, (sample, target, peak) in enumerate(zip(candidate, original.detach().float(), data_range(original))):
        if mask is None:
            metric = SSIMMetric(spatial_dims=3, data_range=float(peak))
            values.append(metric(sample[None], target[None]).reshape(()))
            continue
        # MONAI's own SSIM map over the valid positions (the same computation SSIMMetric averages).
        ssim_map, _ = compute_ssim_and_cs(
            sample[None], target[None], 3, [SSIM_WINDOW] * 3, [_SSIM_SIGMA] * 3, data_range=float(peak)
        )
        half = SSIM_WINDOW // 2
        inside = mask[index, 0, half:-half, half:-half, half:-half].bool()
        values.append(ssim_map[0, 0][inside].mean() if inside.any() else torch.tensor(float("nan")))
    return torch.stack(values)


def brain_mask(original: torch.Tensor) -> torch.Tensor:
    """Voxels of the brain in a site's crops ``(B, 1, D, H, W)``: the non-zero ones.

    Volumes are skull-stripped with a zero background, and the sites' normalisation (MONAI ``NormalizeIntensity``
    with ``nonzero=True``) leaves those zeros at exactly zero.
    """
    return (original.detach() != 0).float()


def psnr_3d(reconstruction: torch.Tensor, original: torch.Tensor, align: bool = True) -> torch.Tensor:
    """PSNR in dB per sample (MONAI ``PSNRMetric``, peak = the original's data range), after alignment.

    Returns:
        ``(B,)`` values; ``inf`` where the (aligned) reconstruction equals the original.
    """
    _check_pair(reconstruction, original)
    candidate = align_intensity(reconstruction, original) if align else reconstruction.detach().float()
    values = []
    for sample, target, peak in zip(candidate, original.detach().float(), data_range(original)):
        metric = PSNRMetric(max_val=float(peak))
        values.append(metric(sample[None], target[None]).reshape(()))
    return torch.stack(values)
