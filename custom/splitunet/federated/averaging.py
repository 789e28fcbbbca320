"""Weighted averaging of state dicts (FedAvg): the step that merges the copies of one model part trained at
several hospitals.

Floating-point tensors (parameters, running statistics) are averaged with the given weights, usually each
hospital's number of training cases. Integer and boolean tensors are counters and flags (BatchNorm's
``num_batches_tracked``), for which a weighted mean is meaningless; they take the element-wise maximum over the
states with a positive weight. The maximum rather than the first state's value because FLARE collects replies in
whatever order they arrive: the maximum does not depend on that order, and for a counter it is the count of the
contributor that saw the most batches, so it never decreases from round to round.

Example::

    from splitunet.federated.averaging import weighted_average

    merged = weighted_average([state_a, state_b], weights=[8, 4])  # state_a counts twice as much as state_b
    model.load_state_dict(merged)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import torch

__all__ = ["weighted_average"]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: ``sum_i w_i * state_i / sum_i w_i`` for every floating-point tensor of the state dicts.

    Floating (and complex) tensors are accumulated in float64 (complex128) and cast back to their own dtype, so
    the result does not depend on the order of the states beyond float64 rounding and averaging identical states
    gives them back bit for bit. Integer and boolean tensors take the element-wise maximum over the states with a
    positive weight (see the module docstring). A state with weight 0 is checked like the others but contributes
    nothing. The result holds new tensors (never views of the inputs), on the devices of ``states[0]``, with its
    keys in the order of ``states[0]``.

    Args:
        states: state dicts with the same keys, and per key the same shape and dtype.
        weights: one finite weight >= 0 per state (e.g. its number of training cases), with a positive sum.

    Returns:
        the averaged state dict.

    Raises:
        ValueError: if ``states`` is empty, ``weights`` has another length, a weight is negative or not finite,
            the weights sum to 0, or the states differ in keys, shapes or dtypes.
        TypeError: if a value of a state is not a :class:`torch.Tensor`.
    """
    states = list(states)
    if not states:
        raise ValueError("weighted_average needs at least one state dict, got none")
    fractions = _normalised_weights(weights, len(states))
    _check_same_structure(states)

    contributors = [i for i, fraction in enumerate(fractions) if fraction > 0]
    averaged: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point() or first.is_complex():
            wide = torch.complex128 if first.is_complex() else torch.float64
            total = torch.zeros(first.shape, dtype=wide, device=first.device)
            for i in contributors:
                total.add_(states[i][key].detach().to(device=first.device, dtype=wide), alpha=fractions[i])
            averaged[key] = total.to(first.dtype)
        else:
            result = states[contributors[0]][key].detach().to(first.device).clone()
            for i in contributors[1:]:
                result = torch.maximum(result, states[i][key].detach().to(first.device))
            averaged[key] = result
    return averaged


def _normalised_weights(weights: Sequence[float], count: int) -> list[float]:
    """``w_i / sum(w)`` as Python floats, after checking the weights."""
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} state dicts")
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight {i} must be a finite number >= 0, got {weight!r}")
    total = math.fsum(float(w) for w in weights)
    if not total > 0:
        raise ValueError(f"the weights must have a positive sum, got {weights}")
    return [float(w) / total for w in weights]


def _check_same_structure(states: list[Mapping[str, torch.Tensor]]) -> None:
    reference = states[0]
    for key, value in reference.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state 0: {key!r} is a {type(value).__name__}, not a torch.Tensor")
    for i, state in enumerate(states[1:], start=1):
        missing, extra = set(reference) - set(state), set(state) - set(reference)
        if missing or extra:
            raise ValueError(
                f"state {i} has other keys than state 0: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
            )
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state {i}: {key!r} is a {type(value).__name__}, not a torch.Tensor")
            expected = reference[key]
            if value.shape != expected.shape:
                raise ValueError(
                    f"state {i}: {key!r} has shape {tuple(value.shape)}, state 0 has {tuple(expected.shape)}"
                )
            if value.dtype != expected.dtype:
                raise ValueError(f"state {i}: {key!r} has dtype {value.dtype}, state 0 has {expected.dtype}")
