"""What an attacker knows about the defenses its observations went through, read from the DXO's filter trail.

Every privacy filter appends its public settings to the DXO meta (``splitunet.filters.base``), and
``CaptureFeatures`` saves that trail with the captured tensors. The captured tensors are already decoded: top-k
levels arrive dense with zeros where values were dropped, quantized levels dequantized. So the attacker knows,
per level and in chain order:

- ``ChannelDropout``: ``rate`` and ``mode``; the zeroed channels (or elements) are visible, the kept ones carry the
  ``1 / (1 - rate)`` rescale.
- ``TopKSparsify``: ``fraction``; the kept entries are the non-zero ones.
- ``QuantizeFeatures``: ``precision``; the per (sample, channel) minimum and step are not in the trail but follow
  from the dequantized tensor (codes span 0 .. 2**bits - 1, so the minimum and maximum are received exactly).
- ``ClippedGaussianNoise``: the clip norm ``C`` and the noise std per level.
- ``BlockSkipLevels``: the withheld levels.

:func:`simulate_defense` applies the same chain to clean features with the attacker's own random generator (for
training a learned inverse on what it will observe), through the filters' own tensor functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from splitunet.wire.codec import densify_top_k, dequantize_affine, quantize_affine, sparsify_top_k
from splitunet.wire.protocol import level_index

__all__ = [
    "DefenseStep",
    "DefenseModel",
    "defense_from_trail",
    "simulate_defense",
    "observed_keep_mask",
    "quantization_bounds",
    "average_releases",
    "PRECISION_BITS",
]

# QuantizeFeatures' precisions -> bits of the affine codes (None: a float16 cast). Copied rather than imported:
# splitunet.filters imports FLARE, which the attacks package must not (docs/design.md, "Boundaries").
PRECISION_BITS = {"float16": None, "int8": 8, "int4": 4, "int2": 2, "int1": 1}

# Filters whose trail records change nothing the attacker models: checks, and the capture itself.
_NEUTRAL = ("FeatureGuard", "CaptureFeatures")


@dataclass(frozen=True)
class DefenseStep:
    """One filter's public settings as the trail recorded them.

    Args:
        filter: the filter's class name (``"ChannelDropout"``, ...).
        levels: the levels it acted on.
        settings: its settings, per kind: ``rate``/``mode``; ``fraction``; ``precision``; ``clip_norm``/``noise_std``
            (level -> float); ``withheld``.
        party: who applied it.
    """

    filter: str
    levels: tuple[int, ...]
    settings: Mapping = field(default_factory=dict)
    party: str | None = None


@dataclass(frozen=True)
class DefenseModel:
    """The chain of defenses an observation went through, in order, as the attacker knows it.

    Args:
        steps: the modelled filters in chain order.
        unknown: names of filters in the trail this model does not know how to simulate (reported, not guessed).
        releases: how many independent releases were averaged into the observation (:func:`average_releases`);
            the effective noise std is the filter's divided by ``sqrt(releases)``.
    """

    steps: tuple[DefenseStep, ...] = ()
    unknown: tuple[str, ...] = ()
    releases: int = 1

    def _find(self, name: str, level: int) -> DefenseStep | None:
        return next((step for step in self.steps if step.filter == name and level in step.levels), None)

    def dropout(self, level: int) -> tuple[float, str] | None:
        """``(rate, mode)`` of the channel dropout at ``level``, or None."""
        step = self._find("ChannelDropout", level)
        return (float(step.settings["rate"]), str(step.settings.get("mode", "channel"))) if step else None

    def top_k(self, level: int) -> float | None:
        """The kept fraction of top-k sparsification at ``level``, or None."""
        step = self._find("TopKSparsify", level)
        return float(step.settings["fraction"]) if step else None

    def precision(self, level: int) -> str | None:
        """The precision QuantizeFeatures sent ``level`` in, or None (levels already top-k encoded pass unchanged)."""
        step = self._find("QuantizeFeatures", level)
        return str(step.settings["precision"]) if step else None

    def noise(self, level: int) -> tuple[float, float] | None:
        """``(clip_norm, effective noise std per element)`` at ``level``, or None."""
        step = self._find("ClippedGaussianNoise", level)
        if step is None:
            return None
        key = f"x{level}"
        std = float(step.settings["noise_std"][key]) / math.sqrt(self.releases)
        return float(step.settings["clip_norm"][key]), std

    def withheld(self) -> tuple[int, ...]:
        """Levels a site withheld (BlockSkipLevels)."""
        return tuple(
            sorted({level for step in self.steps if step.filter == "BlockSkipLevels" for level in step.levels})
        )

    @property
    def is_empty(self) -> bool:
        """No modelled defense (the non-adaptive attacks are then already the adapted ones)."""
        return not self.steps

    def describe(self) -> list[str]:
        """Short public description of each step, e.g. ``"ChannelDropout rate 0.5 (channel) on x0-x4"``."""
        out = []
        for step in self.steps:
            where = ",".join(f"x{level}" for level in step.levels)
            details = {k: v for k, v in step.settings.items() if k not in ("clip_norm", "noise_std")}
            if step.filter == "ClippedGaussianNoise":
                details["noise_std"] = {k: round(float(v), 4) for k, v in step.settings["noise_std"].items()}
            out.append(f"{step.filter} {details} on {where}")
        return out + [f"{name} (not modelled)" for name in self.unknown]


def _levels(entry: Mapping, key: str = "levels") -> tuple[int, ...]:
    return tuple(sorted(level_index(k) if isinstance(k, str) else int(k) for k in entry.get(key) or ()))


def defense_from_trail(trail: Sequence[Mapping] | None) -> DefenseModel:
    """Parse a capture's filter trail into the defense the attacker knows.

    Args:
        trail: ``capture.filter_trail`` (a list of records, one per filter call, in chain order).

    Returns:
        the :class:`DefenseModel`; records of a filter that acted on no level are skipped, filters the model does
        not know are listed in ``unknown``.
    """
    steps, unknown = [], []
    for entry in trail or ():
        name = entry.get("filter")
        if name in _NEUTRAL or name is None:
            continue
        party = entry.get("party")
        if name == "ChannelDropout":
            steps.append(DefenseStep(name, _levels(entry), {"rate": entry["rate"], "mode": entry["mode"]}, party))
        elif name == "TopKSparsify":
            steps.append(DefenseStep(name, _levels(entry), {"fraction": entry["fraction"]}, party))
        elif name == "QuantizeFeatures":
            steps.append(DefenseStep(name, _levels(entry), {"precision": entry["precision"]}, party))
        elif name == "ClippedGaussianNoise":
            settings = {"clip_norm": dict(entry["clip_norm"]), "noise_std": dict(entry["noise_std"])}
            steps.append(DefenseStep(name, _levels(entry), settings, party))
        elif name == "BlockSkipLevels":
            steps.append(DefenseStep(name, _levels(entry, "withheld"), {}, party))
        else:
            unknown.append(str(name))
            continue
        if not steps[-1].levels:
            steps.pop()  # e.g. BlockSkipLevels on a DXO that carried none of its levels
    return DefenseModel(tuple(steps), tuple(unknown))


def _dropout_mask(tensor: torch.Tensor, rate: float, mode: str, generator: torch.Generator) -> torch.Tensor:
    # The filter's own mask, lazily imported: splitunet.filters pulls in FLARE, which importing the attacks must
    # not (tests/evaluation/attacks/test_package_boundary.py). A filter seeded from the attacker's generator.
    from splitunet.filters.channel_dropout import ChannelDropout

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return ChannelDropout(rate=rate, mode=mode, seed=seed).mask(tensor)


def _quantize(tensor: torch.Tensor, precision: str) -> torch.Tensor:
    bits = PRECISION_BITS[precision]
    if bits is None:
        return tensor.to(torch.float16).to(tensor.dtype)
    payload, encoding = quantize_affine(tensor, bits)
    return dequantize_affine(payload, encoding)


def simulate_defense(
    features: Mapping[int, torch.Tensor], defense: DefenseModel, generator: torch.Generator
) -> dict[int, torch.Tensor]:
    """Apply the defense chain to clean features, as the filters would, with the attacker's own random draws.

    Uses the filters' own tensor functions (``ChannelDropout.mask``, ``clip_and_noise``, the wire codec's
    ``sparsify_top_k`` and ``quantize_affine`` and their decoders), so the simulated observation has the
    distribution of the real one; the random draws (dropout masks, noise) are the attacker's, not the site's.

    Args:
        features: level -> clean ``(B, C, D, H, W)`` features.
        defense: the parsed defense.
        generator: the attacker's random generator.

    Returns:
        level -> what the attacker would observe (withheld levels removed).
    """
    from splitunet.filters.clipped_gaussian_noise import clip_and_noise  # lazily: see _dropout_mask

    out = {level: tensor for level, tensor in features.items()}
    for step in defense.steps:
        for level in step.levels:
            if level not in out:
                continue
            tensor = out[level]
            if step.filter == "ChannelDropout":
                rate = float(step.settings["rate"])
                keep = _dropout_mask(tensor, rate, step.settings["mode"], generator).to(tensor.device)
                out[level] = tensor * keep / (1.0 - rate)
            elif step.filter == "TopKSparsify":
                values, encoding = sparsify_top_k(tensor, float(step.settings["fraction"]))
                out[level] = densify_top_k(values, encoding)
            elif step.filter == "QuantizeFeatures":
                out[level] = _quantize(tensor, step.settings["precision"])
            elif step.filter == "ClippedGaussianNoise":
                key = f"x{level}"
                clip = float(step.settings["clip_norm"][key])
                multiplier = float(step.settings["noise_std"][key]) / clip
                out[level], _ = clip_and_noise(tensor, clip, multiplier, generator)
            elif step.filter == "BlockSkipLevels":
                del out[level]
    return out


def observed_keep_mask(observed: torch.Tensor, defense: DefenseModel, level: int) -> torch.Tensor | None:
    """Which received entries carry information, from what is visible: ``None`` if all do.

    Dropped channels (channel dropout) are all-zero channels; dropped elements (element dropout, top-k) are zeros.
    A feature that is exactly zero without the defense is rare (LeakyReLU outputs), and marking it dropped only
    loses one constraint.

    Returns:
        a boolean mask broadcastable to ``observed`` (``(B, C, 1, 1, 1)`` for channel dropout alone), or None.
    """
    mask = None
    dropout = defense.dropout(level)
    if dropout is not None:
        if dropout[1] == "channel":
            mask = observed.flatten(2).abs().amax(dim=2)[..., None, None, None] > 0
        else:
            mask = observed != 0
    if defense.top_k(level) is not None:
        nonzero = observed != 0
        mask = nonzero if mask is None else mask & nonzero
    return mask


def quantization_bounds(observed: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Interval each received value's original lies in, given an affine integer quantization (None for float16).

    Each (sample, channel) was coded as ``low + code * step`` with ``low`` its minimum and ``low + (2**bits - 1) *
    step`` its maximum, so both are received exactly, ``step = (max - min) / (2**bits - 1)``, and the original of
    a received value ``v`` lies in ``[v - step / 2, v + step / 2]`` clipped to ``[min, max]``.

    Returns:
        ``(lower, upper)`` tensors shaped like ``observed``.
    """
    bits = PRECISION_BITS[precision]
    if bits is None:
        return None
    flat = observed.flatten(2)
    low = flat.amin(dim=2)[..., None, None, None]
    high = flat.amax(dim=2)[..., None, None, None]
    half = (high - low) / ((1 << bits) - 1) / 2
    return torch.maximum(observed - half, low), torch.minimum(observed + half, high)


def average_releases(
    observations: Sequence[Mapping[int, torch.Tensor]], defense: DefenseModel
) -> tuple[dict[int, torch.Tensor], DefenseModel]:
    """Average several releases of the same crop (the same case at the same place) to shrink the noise.

    Independent Gaussian noise averages down as ``1 / sqrt(n)``. With dropout or top-k an entry is averaged over
    the releases that kept it (its zeros are not measurements); a level seen in only some releases is averaged
    over those.

    Args:
        observations: level -> tensor per release, all of the same crop and shapes.
        defense: the defense of one release.

    Returns:
        ``(averaged observation, defense with releases = n)``; the noise std the model then reports is the
        per-release std over ``sqrt(n)`` (exact for entries kept in every release, optimistic for the others).
    """
    if not observations:
        raise ValueError("average_releases needs at least one observation")
    levels = sorted({level for observation in observations for level in observation})
    averaged = {}
    for level in levels:
        stack = torch.stack([o[level].float() for o in observations if level in o])
        kept = [observed_keep_mask(t, defense, level) for t in stack]
        if kept[0] is None:
            averaged[level] = stack.mean(0)
            continue
        weights = torch.stack([k.expand_as(t).float() for k, t in zip(kept, stack)])
        averaged[level] = (stack * weights).sum(0) / weights.sum(0).clamp_min(1.0)
    return averaged, replace(defense, releases=defense.releases * len(observations))
