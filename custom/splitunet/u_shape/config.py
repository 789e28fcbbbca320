"""What the server of the U-shaped job tells every hospital at setup, in one validated place.

Plain data, no torch and no FLARE: both sides import it. The hospitals train the head and tail with these settings;
the server trains the middle with the same optimiser settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from splitunet.errors import SplitUNetConfigError
from splitunet.wire.model_config import check_crop_size

__all__ = ["UShapeConfig", "LOSSES", "six_features"]

# The split job's losses (splitunet.server.trainer.make_loss), by the same names.
LOSSES = ("dice_ce", "dice_focal")


def six_features(features: Sequence[int]) -> tuple[int, ...]:
    """BasicUNet's six feature sizes from five or six ints (the sixth repeats the first)."""
    fea = tuple(int(f) for f in features)
    if len(fea) == 5:
        fea = fea + (fea[0],)
    if len(fea) != 6 or min(fea) < 1:
        raise ValueError(f"features must be 5 or 6 positive ints, got {tuple(features)}")
    return fea


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SplitUNetConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass
class UShapeConfig:
    """Model, optimiser and sampling settings shared by the hospitals and the server.

    Args:
        features: BasicUNet's feature sizes (5 or 6 ints; the sixth defaults to the first).
        learning_rate: Adam learning rate of every part.
        weight_decay: AdamW's decoupled weight decay (:mod:`splitunet.networks.optimizer`).
        seed: seed of the parts' initial weights (every hospital starts from the same head and tail) and of each
            hospital's case split and crop sampling.
        batch_size: crops per hospital and iteration.
        crop_size: training crop ``(D, H, W)``, at least 32 per axis (the bottleneck is at 1/16 and instance norm
            needs more than one voxel there); also the sliding-window size at validation.
        loss: ``"dice_ce"`` or ``"dice_focal"``, on sigmoid outputs of TC, WT and ET.
        num_val_cases: cases each hospital holds out for validation.
        sw_batch_size: windows per round trip at validation.
        sw_overlap: sliding-window overlap.
    """

    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    seed: int = 0
    batch_size: int = 2
    crop_size: tuple[int, int, int] = (48, 48, 48)
    loss: str = "dice_ce"
    num_val_cases: int = 1
    sw_batch_size: int = 4
    sw_overlap: float = 0.25

    def __post_init__(self):
        try:
            self.features = six_features(self.features)
        except (TypeError, ValueError) as error:
            raise SplitUNetConfigError(str(error)) from None
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise SplitUNetConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise SplitUNetConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise SplitUNetConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        _positive_int("batch_size", self.batch_size)
        _positive_int("num_val_cases", self.num_val_cases)
        _positive_int("sw_batch_size", self.sw_batch_size)
        self.crop_size = check_crop_size(self.crop_size)
        if self.loss not in LOSSES:
            raise SplitUNetConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not isinstance(self.sw_overlap, (int, float)) or not 0 <= self.sw_overlap < 1:
            raise SplitUNetConfigError(f"sw_overlap must be in [0, 1), got {self.sw_overlap!r}")
        self.learning_rate, self.weight_decay, self.sw_overlap = (
            float(self.learning_rate),
            float(self.weight_decay),
            float(self.sw_overlap),
        )

    def to_dict(self) -> dict:
        """Plain-JSON form, as sent in the setup task."""
        content = asdict(self)
        content["features"] = list(self.features)
        content["crop_size"] = list(self.crop_size)
        return content

    @classmethod
    def from_dict(cls, content: dict) -> "UShapeConfig":
        """Inverse of :meth:`to_dict`; unknown keys are refused (a newer server's setting would be ignored)."""
        unknown = set(content) - set(cls.__dataclass_fields__)
        if unknown:
            raise SplitUNetConfigError(f"unknown U-shape settings {sorted(unknown)}")
        return cls(**content)
