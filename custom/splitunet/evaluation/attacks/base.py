"""The one contract every attack follows, after breaching's ``reconstruct(...) -> (data, stats)``.

An attack is configured once (its threat model's knowledge and its optimisation settings, validated up front)
and then called on what the attacker observed::

    reconstruction, stats = attack.reconstruct(observed, crop_size=plan["size"])

``observed`` maps level index (or ``"x0"``-style key) to a ``(B, C, D, H, W)`` tensor, as the attacker holds it
after every defense; ``reconstruction`` is ``(B, 1, D, H, W)`` (an image, or a mask for label inference) and
``stats`` a small JSON-serializable dictionary (settings, losses, seconds). Geiping et al., "breaching"
(``breaching/attacks/base_attack.py``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch

from splitunet.wire.protocol import NUM_LEVELS

__all__ = ["Attack", "check_levels", "check_positive_int", "check_non_negative", "check_positive"]


class Attack(ABC):
    """Base of the attacks: a name, the threat model in words, and :meth:`reconstruct`."""

    name: ClassVar[str]
    threat_model: ClassVar[str]

    @abstractmethod
    def reconstruct(
        self, observed: Mapping[int | str, torch.Tensor], crop_size: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Reconstruct the private data behind ``observed``.

        Args:
            observed: level -> ``(B, C, D, H, W)`` tensors as the attacker holds them.
            crop_size: the crop size ``(D, H, W)`` (a capture's ``plan["size"]``); inferred when omitted.

        Returns:
            ``(reconstruction (B, 1, D, H, W), stats)``.
        """


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_non_negative(name: str, value) -> float:
    """``value`` as a finite float >= 0, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    """``value`` as a finite float > 0, else ValueError naming ``name``."""
    if check_non_negative(name, value) == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_levels(levels: Iterable[int] | None) -> tuple[int, ...] | None:
    """``None`` (the attack picks), or a non-empty sorted tuple of levels in 0..4, else ValueError."""
    if levels is None:
        return None
    chosen = tuple(sorted({int(level) for level in levels}))
    if not chosen or any(not 0 <= level < NUM_LEVELS for level in chosen):
        raise ValueError(f"levels must be None or a non-empty subset of 0..{NUM_LEVELS - 1}, got {chosen}")
    return chosen
