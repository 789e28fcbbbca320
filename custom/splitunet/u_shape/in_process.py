"""The U-shaped protocol in one process: the same trainer calls as the FLARE workflow, without FLARE.

Tests use it to check learning and what the server receives; attacks use it to run the server's side with full
access to its inputs. Each function is one step of :class:`~splitunet.u_shape.controller.UShapeController`'s loop,
with the hospitals' trainers called directly instead of through tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from splitunet.federated.drift_correction import DriftCorrection
from splitunet.u_shape.averaging import average_parts
from splitunet.u_shape.hospital_trainer import HospitalTrainer
from splitunet.u_shape.server_trainer import MiddleTrainer

__all__ = ["CROSSINGS", "Crossing", "train_iteration", "average_round", "validate", "train"]

Hospitals = Mapping[str, HospitalTrainer]
# The tensors that cross between a hospital and the server in one iteration, in order: x0 up, u2 down, dL/du2 up,
# dL/dx0 down.
CROSSINGS = ("x0", "u2", "du2", "dx0")
# ``crossing(name, party, tensor)`` -> the tensor as it arrives (name one of CROSSINGS).
Crossing = Callable[[str, str, torch.Tensor], torch.Tensor]


def _unchanged(name: str, party: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def train_iteration(hospitals: Hospitals, server: MiddleTrainer, crossing: Crossing | None = None) -> dict[str, float]:
    """One iteration: heads, the middle, tails and losses, the middle's backward, the heads' backward.

    Args:
        hospitals: the hospitals' trainers, by name.
        server: the middle's trainer.
        crossing: called on each tensor as it crosses (:data:`CROSSINGS`); what it returns is what arrives. It
            stands for the wire (e.g. the job's int8 codes, encoded and decoded) and lets an evaluation record what
            the server receives. Default: every tensor arrives as sent.

    Returns:
        the loss of each hospital.
    """
    cross = crossing or _unchanged
    u2 = server.forward({party: cross("x0", party, hospital.forward()) for party, hospital in hospitals.items()})
    tails = {party: hospital.tail_step(cross("u2", party, u2[party])) for party, hospital in hospitals.items()}
    dx0 = server.backward({party: cross("du2", party, du2) for party, (du2, _) in tails.items()})
    for party, hospital in hospitals.items():
        hospital.finish_step(cross("dx0", party, dx0[party]))
    return {party: loss for party, (_, loss) in tails.items()}


def average_round(hospitals: Hospitals, round_index: int, correction: DriftCorrection | None = None) -> dict:
    """Average heads and tails by case count (then DWCS, if given) and give every hospital the result."""
    averaged = average_parts(
        {party: hospital.parts_state() for party, hospital in hospitals.items()},
        {party: hospital.num_train_cases for party, hospital in hospitals.items()},
        round_index,
        correction,
    )
    for hospital in hospitals.values():
        hospital.load_parts(averaged)
    return averaged


def validate(hospitals: Hospitals, server: MiddleTrainer) -> dict[str, dict[str, float]]:
    """Sliding-window validation of every hospital's held-out cases, one window batch per exchange.

    Returns:
        each hospital's Dice (TC, WT, ET, mean).
    """
    for hospital in hospitals.values():
        hospital.start_validation()
    waiting = {party: hospital.next_windows() for party, hospital in hospitals.items()}
    while True:
        waiting = {party: x0 for party, x0 in waiting.items() if x0 is not None}
        if not waiting:
            break
        u2 = server.infer(waiting)
        for party in waiting:
            hospitals[party].take_windows(u2[party])
        waiting = {party: hospitals[party].next_windows() for party in waiting}
    return {party: hospital.validation_dice() for party, hospital in hospitals.items()}


def train(
    hospitals: Hospitals,
    server: MiddleTrainer,
    num_rounds: int,
    iterations_per_round: int,
    correction: DriftCorrection | None = None,
) -> list[dict[str, float]]:
    """``num_rounds`` rounds of ``iterations_per_round`` iterations, each round ending with the averaging.

    Returns:
        every iteration's losses, by hospital.
    """
    losses = []
    for round_index in range(num_rounds):
        for _ in range(iterations_per_round):
            losses.append(train_iteration(hospitals, server))
        average_round(hospitals, round_index, correction)
    return losses
