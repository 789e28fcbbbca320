"""A hospital's own cases: all four modalities and the labels, read where they lie, normalised at the hospital.

In the U-shaped split one hospital holds whole cases, as a centralized dataset copy does, so its folder is an MSD
Task01 folder (``dataset.json``, ``imagesTr``, ``labelsTr``; what :func:`~splitunet.data.phantom.generate_phantom`
writes) or a BraTS 2021/2023 folder. The dataset readers of :mod:`splitunet.data.layouts` find the files; voxels
are read and checked by :func:`~splitunet.data.nifti_io.read_volume`; each modality gets the per-volume z-score over
the brain that the split job's sites apply (:class:`~splitunet.data.party_data.ModalityFolder`).
"""

from __future__ import annotations

from collections import OrderedDict
from os import PathLike
from pathlib import Path

import numpy as np
from monai.transforms import NormalizeIntensity
from monai.utils import convert_to_numpy

from splitunet.data.labels import LAYOUTS, labels_to_regions
from splitunet.data.layouts import SOURCE_LAYOUTS, SourceCase, find_source_cases
from splitunet.data.nifti_io import read_volume
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.wire.protocol import MODALITIES

__all__ = ["HospitalFolder"]


class HospitalFolder:
    """A hospital's dataset: per case a ``(4, D, H, W)`` image (modalities in ``protocol.MODALITIES`` order) and
    its ``(3, D, H, W)`` region masks (TC, WT, ET).

    Args:
        data_dir: the dataset folder (MSD task folder or BraTS training folder).
        layout: ``"msd"``, ``"brats2021"`` or ``"brats2023"``: the files' names and the labels' numbering.
        party: this hospital's name (for error messages).
        max_cached: how many cases to keep in memory (``None``: all; ``0``: none).

    Raises:
        SplitUNetConfigError: unknown layout.
        SplitUNetDataError: see :func:`~splitunet.data.layouts.find_source_cases`.
    """

    def __init__(self, data_dir: str | PathLike, layout: str = "msd", *, party: str, max_cached: int | None = None):
        if layout not in SOURCE_LAYOUTS or layout not in LAYOUTS:
            raise SplitUNetConfigError(f"{party}: unknown layout {layout!r}; expected one of {list(SOURCE_LAYOUTS)}")
        self.folder = Path(data_dir)
        if not self.folder.is_dir():
            raise SplitUNetDataError("data folder not found (or not a folder)", party=party, file=self.folder)
        self.layout = layout
        self.party = party
        self.max_cached = max_cached
        self.cases: dict[str, SourceCase] = {case.case: case for case in find_source_cases(self.folder, layout)}
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        # Per volume and modality, over the brain (nonzero voxels), as the split job's sites normalise.
        self._normalize = NormalizeIntensity(nonzero=True, channel_wise=True)

    @property
    def case_ids(self) -> list[str]:
        """Case IDs, sorted."""
        return sorted(self.cases)

    def shape(self, case_id: str) -> tuple[int, int, int]:
        """Spatial shape of a case (reads it, then it is cached like :meth:`read`)."""
        image, _ = self.read(case_id)
        return tuple(int(s) for s in image.shape[1:])

    def read(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """A case's normalised image and region masks.

        Returns:
            ``(image, regions)``: read-only ``float32`` ``(4, D, H, W)`` and ``uint8`` ``(3, D, H, W)``.

        Raises:
            SplitUNetDataError: unknown case, a bad file, volumes on different grids, labels outside the layout.
        """
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            return self._cache[case_id]
        value = self._load(case_id)
        if self.max_cached != 0:
            self._cache[case_id] = value
            while self.max_cached is not None and len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return value

    def _load(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        source = self.cases.get(case_id)
        if source is None:
            raise SplitUNetDataError("no such case in the hospital's dataset", party=self.party, case=case_id)
        files: dict[Path, np.ndarray] = {}
        channels = []
        for modality in MODALITIES:
            image = source.images[modality]
            if image.path not in files:
                ndim = (3,) if image.channels is None else (4,)
                files[image.path], _, _ = read_volume(
                    image.path, party=self.party, case=case_id, ndim=ndim, channels=image.channels
                )
            data = files[image.path]
            channels.append(data if image.channel is None else data[..., image.channel])
        label, _, _ = read_volume(source.label, party=self.party, case=case_id, ndim=(3,))
        shapes = {tuple(channel.shape) for channel in channels} | {tuple(label.shape)}
        if len(shapes) != 1:
            raise SplitUNetDataError(
                f"modalities and labels lie on different grids {sorted(shapes)}", party=self.party, case=case_id
            )
        stacked = np.stack(channels).astype(np.float32, copy=False)
        image = np.ascontiguousarray(convert_to_numpy(self._normalize(stacked)), dtype=np.float32)
        regions = labels_to_regions(label, self.layout, party=self.party, case=case_id, file=source.label)
        image.setflags(write=False)
        regions.setflags(write=False)
        return image, regions
