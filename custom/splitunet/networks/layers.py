"""Layer choices both halves of the U-Net share, so that the split model equals MONAI's BasicUNet."""

__all__ = ["DEFAULT_ACT", "DEFAULT_NORM"]

# BasicUNet's defaults: LeakyReLU(0.1) and affine instance norm.
DEFAULT_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
DEFAULT_NORM = ("instance", {"affine": True})
