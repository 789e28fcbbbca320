"""The model and optimisation settings the server sends to every site at setup, in one validated place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from splitunet.errors import SplitUNetConfigError
from splitunet.wire.protocol import NUM_LEVELS

__all__ = ["SplitModelConfig", "TRANSFER_DTYPES", "MIN_CROP_SIZE", "check_crop_size"]

TRANSFER_DTYPES = ("float32", "float16")
_BOTTLENECK = NUM_LEVELS - 1
# The bottleneck x4 is at 1/16 resolution and instance norm needs more than one voxel there: 32 gives 2 per axis.
MIN_CROP_SIZE = 32


def check_crop_size(crop_size, name: str = "crop_size") -> tuple[int, int, int]:
    """``crop_size`` as three ints, each at least :data:`MIN_CROP_SIZE` (training crops and inference windows).

    Raises:
        SplitUNetConfigError: not three ints of at least :data:`MIN_CROP_SIZE`.
    """
    try:
        size = tuple(int(c) for c in crop_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < MIN_CROP_SIZE:
        raise SplitUNetConfigError(f"{name} must be three ints >= {MIN_CROP_SIZE}, got {crop_size}")
    return size


@dataclass
class SplitModelConfig:
    """Hyper-parameters shared by the encoders (sites) and the decoder (server).

    Args:
        features: BasicUNet feature sizes: five encoder levels and the post-upsampling size (5 values: the
            sixth defaults to the first).
        skip_levels: skip levels x0..x3 the sites send; the bottleneck x4 is always sent.
        fusion: how the decoder fuses the sites' features per level: ``"concat"`` (exact multi-modal U-Net)
            or ``"mean"`` (tolerates an absent modality).
        learning_rate: Adam learning rate, the same at every party.
        weight_decay: Adam weight decay.
        seed: seed of parameter initialisation; each party offsets it by its role.
        transfer_dtype: dtype of activations and gradients on the wire (``"float32"`` or ``"float16"``).
        train_encoders: ``True``: the server returns the gradients of the sites' features and the sites train
            their encoders. ``False``: no gradient ever leaves the server and every encoder stays at its private
            random initialisation (the decoder learns on fixed random features). Nothing label-derived then
            reaches a site, and a server cannot steer a site's encoder (docs/design.md, "Threat models").
    """

    # The shipped jobs' widths and rate: one place for the defaults of every party and workflow.
    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    skip_levels: tuple[int, ...] = (0, 1, 2, 3)
    fusion: str = "concat"
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    seed: int = 0
    transfer_dtype: str = "float32"
    train_encoders: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        features = tuple(int(f) for f in self.features)
        if len(features) == 5:
            features = features + (features[0],)
        if len(features) != 6 or min(features) < 1:
            raise SplitUNetConfigError(f"features must be 5 or 6 positive ints, got {self.features}")
        self.features = features
        levels = tuple(sorted({int(level) for level in self.skip_levels}))
        if any(not 0 <= level < _BOTTLENECK for level in levels):
            raise SplitUNetConfigError(f"skip_levels must be within 0..{_BOTTLENECK - 1}, got {self.skip_levels}")
        self.skip_levels = levels
        if self.fusion not in ("concat", "mean"):
            raise SplitUNetConfigError(f"fusion must be 'concat' or 'mean', got {self.fusion!r}")
        if self.transfer_dtype not in TRANSFER_DTYPES:
            raise SplitUNetConfigError(f"transfer_dtype must be one of {TRANSFER_DTYPES}, got {self.transfer_dtype!r}")
        if not isinstance(self.train_encoders, bool):
            raise SplitUNetConfigError(f"train_encoders must be true or false, got {self.train_encoders!r}")
        if not self.learning_rate > 0:
            raise SplitUNetConfigError(f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def sent_levels(self) -> tuple[int, ...]:
        """Levels a site sends each step: the skip levels plus the bottleneck."""
        return self.skip_levels + (_BOTTLENECK,)

    def to_dict(self) -> dict:
        """Plain-JSON form, as sent in the setup task."""
        content = asdict(self)
        content["features"] = list(self.features)
        content["skip_levels"] = list(self.skip_levels)
        return content

    @classmethod
    def from_dict(cls, content: dict) -> "SplitModelConfig":
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(content) - known
        if unknown:
            raise SplitUNetConfigError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**content)
