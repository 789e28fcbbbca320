"""The optimiser every party trains its model part with: Adam with decoupled weight decay (AdamW).

Why not ``torch.optim.Adam(weight_decay=...)``: Adam adds the decay to the gradient and then divides by the
gradient's running magnitude. Where the loss gradient of a weight is about as small as ``weight_decay * w`` (the
U-Net's deepest blocks: measured at the job's initialisation, their per-weight gradients are 0.8-4x the decay
term), the decay dominates the normalised step, which then moves the weight by about ``learning_rate`` towards
zero at every step. At the job's rate (2e-3) the encoders' ``down_3``/``down_4`` and the decoder's ``upcat_4``
shrank from about 1e-2 to 1e-11 within 400 iterations: the bottleneck carried nothing and its gradients were
exactly zero. Decoupled decay (Loshchilov and Hutter, ICLR 2019) shrinks each weight by ``learning_rate *
weight_decay`` of itself per step instead, whatever its gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["OPTIMIZER_NAME", "make_optimizer", "trained_by_this_optimizer"]

# Recorded with the studies' results: a run trained under Adam's coupled decay (no name recorded) is not reused.
OPTIMIZER_NAME = "AdamW"


def make_optimizer(parameters: Iterable[torch.nn.Parameter], learning_rate: float, weight_decay: float):
    """The optimiser of a party's model part.

    Args:
        parameters: the parameters the party trains.
        learning_rate: Adam's step size.
        weight_decay: decoupled decay: each step multiplies a weight by ``1 - learning_rate * weight_decay``.

    Returns:
        ``torch.optim.AdamW`` over ``parameters``.
    """
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)


def trained_by_this_optimizer(summary: dict) -> bool:
    """Whether a run's ``results.json`` names :data:`OPTIMIZER_NAME`: a run without it was trained under Adam's
    coupled decay, which collapsed the deepest blocks, and a study trains it again rather than reuse it."""
    return summary.get("optimizer") == OPTIMIZER_NAME
