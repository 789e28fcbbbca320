"""The evaluator's view of a U-shaped run's data: each hospital's crops, replayed, and the attacker's priors.

A U-shape hospital draws its crops itself (:class:`~splitunet.data.sampling.RandomCropPlanner`, seeded by the job's
seed, over its own training cases) and sends no plan, so the evaluator replays the planner: it builds the hospital's
trainer from the hospital's folder and the job's settings, exactly as the hospital's setup task does, and draws the
same plans in the same order. :func:`replay_error` checks the replay against what the server received. Only the
evaluation holds this; no attack reads it.

The priors are what the server could know without the exchanges: the mean of auxiliary phantom patients' crops cut
at the attacked crop's place (per modality, :class:`~splitunet.evaluation.leakage.ground_truth.AuxiliaryImages`), and
the frequency of the whole tumour there. Cut at the true place, they are generous to the prior: the server does not
know where a hospital's crop lies.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.sampling import extract_crop
from splitunet.evaluation.leakage.ground_truth import AuxiliaryImages
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.hospital_trainer import HospitalTrainer
from splitunet.wire.protocol import MODALITIES, REGIONS

__all__ = ["HospitalCrops", "AuxiliaryHospital", "replay_error"]


def _stack(volumes: list[np.ndarray], plan: Mapping) -> torch.Tensor:
    crops = [
        extract_crop(volume, origin, plan["size"], flips)
        for volume, origin, flips in zip(volumes, plan["origins"], plan["flips"])
    ]
    return torch.from_numpy(np.stack(crops).astype(np.float32))


class HospitalCrops:
    """A hospital's training crops by iteration, replayed from its seeded crop planner.

    Args:
        folder: the hospital's dataset.
        config: the settings the server sent (seed, crop size, batch size, held-out cases).
    """

    def __init__(self, folder: HospitalFolder, config: UShapeConfig):
        self.folder = folder
        # The hospital's own setup: the same case split and the same seeded planner.
        trainer = HospitalTrainer(folder)
        trainer.build(config)
        self._planner = trainer.planner
        self._plans: list[dict] = []

    def plan(self, iteration: int) -> dict:
        """The crop plan of training iteration ``iteration`` (1-based)."""
        if iteration < 1:
            raise ValueError(f"iterations count from 1, got {iteration}")
        while len(self._plans) < iteration:
            self._plans.append(self._planner.next_plan())
        return self._plans[iteration - 1]

    def images(self, iteration: int) -> torch.Tensor:
        """The crops the head encoded at ``iteration``: ``(B, 4, d, h, w)``, modalities in ``MODALITIES`` order."""
        plan = self.plan(iteration)
        return _stack([self.folder.read(case)[0] for case in plan["keys"]], plan)

    def region(self, iteration: int, region: str = "WT") -> torch.Tensor:
        """The true ``region`` masks of those crops: ``(B, 1, d, h, w)`` in {0, 1}."""
        plan = self.plan(iteration)
        channel = REGIONS.index(region)
        return _stack([self.folder.read(case)[1][channel : channel + 1] for case in plan["keys"]], plan)


class _OneChannel:
    """One channel of a hospital's images (or region masks), read as a modality folder is
    (what :class:`AuxiliaryImages` reads)."""

    def __init__(self, folder: HospitalFolder, channel: int, regions: bool = False):
        self.hospital = folder
        self.folder = folder.folder
        self.channel = channel
        self.part = 1 if regions else 0

    @property
    def case_ids(self) -> list[str]:
        return self.hospital.case_ids

    def read(self, case_id: str) -> tuple[np.ndarray]:
        return (self.hospital.read(case_id)[self.part][self.channel].astype(np.float32),)


class AuxiliaryHospital:
    """Phantom patients the attacker holds (none of them a hospital's): its priors for a crop.

    Args:
        folder: a hospital-layout dataset of auxiliary cases (all four modalities and the labels).
    """

    def __init__(self, folder: HospitalFolder):
        self.modalities = [AuxiliaryImages(_OneChannel(folder, channel)) for channel in range(len(MODALITIES))]
        self.whole_tumour = AuxiliaryImages(_OneChannel(folder, REGIONS.index("WT"), regions=True))

    def image_prior(self, plan: Mapping) -> torch.Tensor:
        """Mean auxiliary image at each planned crop's place: ``(B, 4, d, h, w)``."""
        return torch.cat([modality.prior(plan) for modality in self.modalities], dim=1)

    def tumour_frequency(self, plan: Mapping) -> torch.Tensor:
        """Share of auxiliary patients with whole tumour at each voxel of each planned crop: ``(B, 1, d, h, w)``."""
        return self.whole_tumour.prior(plan)


def replay_error(head: torch.nn.Module, images: torch.Tensor, received_x0: torch.Tensor) -> dict:
    """How far the known head on the replayed crops is from the ``x0`` the server received.

    At a round's first iteration the server's head is the hospital's, so the two differ by the wire's rounding
    alone (half an int8 step per (sample, channel)); a larger error means the replay drew other crops.

    Returns:
        ``{"max_abs_error", "tolerance", "matches"}``.
    """
    with torch.no_grad():
        computed = head(images)
    flat = received_x0.flatten(2)
    # One int8 step per (sample, channel): twice the rounding bound, leaving room for float reordering.
    tolerance = float(((flat.amax(-1) - flat.amin(-1)) / 255).max()) + 1e-4
    error = float((computed - received_x0).abs().max())
    return {"max_abs_error": error, "tolerance": tolerance, "matches": error <= tolerance}
