"""Leakage measures in plain torch/MONAI: image similarity of reconstructions, Dice of inferred labels.

Never imported by the training path (docs/design.md, "Boundaries"): only ``splitunet leakage`` and the tests use them.
"""

from splitunet.evaluation.metrics.image_similarity import SSIM_WINDOW, align_intensity, data_range, psnr_3d, ssim_3d
from splitunet.evaluation.metrics.label_similarity import expected_random_dice, mask_dice, random_mask_like
from splitunet.evaluation.metrics.leakage import image_leakage, mean_image_prior, relative_leakage

__all__ = [
    "SSIM_WINDOW",
    "align_intensity",
    "data_range",
    "psnr_3d",
    "ssim_3d",
    "expected_random_dice",
    "mask_dice",
    "random_mask_like",
    "image_leakage",
    "mean_image_prior",
    "relative_leakage",
]
