"""The evaluator's view of the data: the crops a capture was computed from, and an uninformed prior for them.

Only the evaluation holds this (all parties' folders and the case-key secret); no attack ever reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from splitunet.data.case_keys import keys_to_case_ids
from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.data.sampling import extract_crop
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.metrics import mean_image_prior
from splitunet.wire.protocol import LABELS_PARTY, REGIONS

__all__ = ["GroundTruth", "AuxiliaryImages"]

_EVALUATOR = "leakage-evaluator"


def _crops(volumes: Sequence[np.ndarray], plan: Mapping) -> torch.Tensor:
    """``(B, C, d, h, w)`` float32 crops of ``(C, D, H, W)`` volumes, cut as the plan says (origins, size, flips)."""
    crops = [
        extract_crop(volume, origin, plan["size"], flips)
        for volume, origin, flips in zip(volumes, plan["origins"], plan["flips"])
    ]
    return torch.from_numpy(np.stack(crops).astype(np.float32))


class GroundTruth:
    """Every party's data of a run, to cut the true crops behind a capture's plan.

    Args:
        parties_dir: output of ``splitunet partition`` (one folder per modality and ``labels``).
        case_key_secret: the secret the run keyed its cases with.
        layout: label layout of the labels folder.
    """

    def __init__(self, parties_dir: str | Path, case_key_secret: str, layout: str = "msd"):
        self.parties_dir = Path(parties_dir)
        if not self.parties_dir.is_dir():
            raise SplitUNetConfigError(f"ground-truth data folder {self.parties_dir} not found")
        self.labels = LabelFolder(self.parties_dir / LABELS_PARTY, layout, party=_EVALUATOR)
        self.key_to_case = keys_to_case_ids(self.labels.case_ids, case_key_secret, party=_EVALUATOR)
        self._folders: dict[str, ModalityFolder] = {}

    def folder(self, modality: str) -> ModalityFolder:
        """The modality's party folder, read with the site's own normalisation."""
        if modality not in self._folders:
            self._folders[modality] = ModalityFolder(self.parties_dir / modality, modality, party=_EVALUATOR)
        return self._folders[modality]

    def cases(self, plan: Mapping) -> list[str]:
        """Case IDs behind a plan's keyed cases."""
        unknown = [key for key in plan["keys"] if key not in self.key_to_case]
        if unknown:
            raise SplitUNetConfigError(
                f"{len(unknown)} case key(s) of the capture match no case in {self.parties_dir} with this secret: "
                "give the data and secret of the run that made the capture"
            )
        return [self.key_to_case[key] for key in plan["keys"]]

    def image_crops(self, modality: str, plan: Mapping) -> torch.Tensor:
        """The crops the site of ``modality`` encoded for ``plan``: ``(B, 1, d, h, w)``."""
        folder = self.folder(modality)
        return _crops([folder.read(case)[0][None] for case in self.cases(plan)], plan)

    def region_crops(self, plan: Mapping, region: str = "WT") -> torch.Tensor:
        """True ``region`` masks (TC, WT or ET) of the plan's crops: ``(B, 1, d, h, w)`` in {0, 1}."""
        channel = REGIONS.index(region)
        regions = [self.labels.read(case)[0][channel : channel + 1] for case in self.cases(plan)]
        return _crops(regions, plan)


class AuxiliaryImages:
    """Images of the attacked modality that the attacker holds: cases of other patients, not the sites'.

    They train the learned inverse and give the uninformed prior, the mean image at the attacked crop's place.

    Args:
        folder: a modality folder of auxiliary cases (normalised like a site's).
    """

    def __init__(self, folder: ModalityFolder):
        self.folder = folder
        if not folder.case_ids:
            raise SplitUNetConfigError(f"no auxiliary cases in {folder.folder}")

    def prior(self, plan: Mapping) -> torch.Tensor:
        """Mean of the auxiliary cases cut at each planned crop's origin and flips: ``(B, 1, d, h, w)``."""
        priors = []
        for origin, flips in zip(plan["origins"], plan["flips"]):
            one = {"size": plan["size"], "origins": [origin], "flips": [flips]}
            crops = torch.cat([_crops([self.folder.read(case)[0][None]], one) for case in self.folder.case_ids])
            priors.append(mean_image_prior(crops))
        return torch.cat(priors)

    def random_crops(self, count: int, size: Sequence[int], seed: int = 0) -> torch.Tensor:
        """``count`` crops of ``size`` at seeded random origins and flips: ``(count, 1, d, h, w)``."""
        rng = np.random.default_rng(seed)
        volumes, origins, flips = [], [], []
        cases = self.folder.case_ids
        for index in range(count):
            volume = self.folder.read(cases[index % len(cases)])[0]
            volumes.append(volume[None])
            origins.append([int(rng.integers(0, max(s - c, 0) + 1)) for s, c in zip(volume.shape, size)])
            flips.append([bool(f) for f in rng.random(3) < 0.5])
        return _crops(volumes, {"size": list(size), "origins": origins, "flips": flips})
