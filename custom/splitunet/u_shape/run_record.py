"""What the U-shaped workflow records about its run, written as ``results.json`` in the server's run folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from splitunet.server.run_record import RunRecord

__all__ = ["UShapeRecord"]


@dataclass
class UShapeRecord(RunRecord):
    """The record of :class:`~splitunet.u_shape.controller.UShapeController` (fields are ``results.json`` keys).

    Attributes:
        rounds: rounds averaged so far.
        hospitals: hospital -> training cases (its averaging weight).
        model: the settings sent to the hospitals.
        drift_correction: the DWCS settings (``None``: plain FedAvg).
        loss_curve: per iteration, each hospital's loss (as it reported it).
        history: per validation, the round, the iteration and each hospital's Dice and HD95 (TC, WT, ET, mean).
        dice: each hospital's Dice at the last validation.
        hd95: each hospital's HD95 (voxels) at the last validation.
        wire: per task, round trips and tensor bytes down (as handed to FLARE, before the server's filters) and up
            (as received, after every filter).
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "status",
        "rounds",
        "iterations",
        "hospitals",
        "model",
        "drift_correction",
        "dice",
        "hd95",
        "history",
        "loss_curve",
        "wire",
        "filters",
        "error",
    )

    rounds: int = 0
    hospitals: dict[str, int] | None = None
    model: dict | None = None
    drift_correction: dict | None = None
    loss_curve: list[dict[str, float]] | None = None
    history: list[dict] | None = None
    dice: dict[str, dict[str, float]] | None = None
    hd95: dict[str, dict[str, float]] | None = None
    wire: dict[str, dict[str, int]] | None = None

    def add_exchange(self, task: str, down_bytes: int, up_bytes: int) -> None:
        """Count one round trip of ``task`` (all hospitals at once) and its tensor bytes."""
        if self.wire is None:
            self.wire = {}
        entry = self.wire.setdefault(task, {"round_trips": 0, "down_bytes": 0, "up_bytes": 0})
        entry["round_trips"] += 1
        entry["down_bytes"] += int(down_bytes)
        entry["up_bytes"] += int(up_bytes)

    def add_losses(self, losses: Mapping[str, float]) -> None:
        """One iteration's losses, by hospital."""
        if self.loss_curve is None:
            self.loss_curve = []
        self.loss_curve.append({party: float(loss) for party, loss in sorted(losses.items())})
        self.iterations = len(self.loss_curve)

    def add_validation(
        self,
        round_number: int,
        iteration: int,
        dice: Mapping[str, Mapping[str, float]],
        hd95: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """One validation's Dice (and HD95), by hospital; they become :attr:`dice` and :attr:`hd95`."""
        if self.history is None:
            self.history = []
        self.dice = {party: dict(values) for party, values in sorted(dice.items())}
        self.hd95 = {party: dict(values) for party, values in sorted((hd95 or {}).items())} or None
        entry = {"round": round_number, "iteration": iteration, "dice": self.dice}
        if self.hd95:
            entry["hd95"] = self.hd95
        self.history.append(entry)
