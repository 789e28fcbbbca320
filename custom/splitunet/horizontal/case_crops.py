"""A hospital's training cases as a torch dataset of one random crop per case: what DP-SGD samples from.

DP-SGD protects the unit a data loader's item is. Here an item is a whole case (every modality and the labels of
one patient): a batch holds at most one crop of each case, so one patient's influence on a step is one clipped
gradient, and epsilon is per patient. Crops are drawn as the non-private round draws them, without looking at labels
(:class:`~splitunet.data.sampling.RandomCropPlanner`: uniform origin where the crop fits, random flips).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.sampling import RandomCropPlanner, extract_crop

__all__ = ["CaseCrops"]


class CaseCrops(Dataset):
    """Item ``i``: a random crop of case ``cases[i]``, as ``(image (4, d, h, w), regions (3, d, h, w))`` float32.

    Args:
        data: the hospital's cases.
        cases: the training cases (the dataset DP-SGD protects).
        crop_size: ``(d, h, w)``.
        seed: seed of the crop positions (each case draws its own sequence).
    """

    def __init__(self, data: HospitalFolder, cases: Sequence[str], crop_size: Sequence[int], seed: int):
        self.data = data
        self.cases = list(cases)
        # One planner per case with batches of one: every item is exactly one crop of its own case.
        self._planners = [
            RandomCropPlanner({case: data.shape(case)}, crop_size, 1, seed + index)
            for index, case in enumerate(self.cases)
        ]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._planners[index].next_plan()
        image, regions = self.data.read(self.cases[index])
        origin, flips = plan["origins"][0], plan["flips"][0]
        crops = (extract_crop(image, origin, plan["size"], flips), extract_crop(regions, origin, plan["size"], flips))
        return tuple(torch.from_numpy(crop.astype(np.float32, copy=False)) for crop in crops)
