"""A hospital's own cases: every modality and the labels of each patient, in one dataset folder.

Unlike a split-learning site, which holds one modality, a hospital (of the horizontal FedAvg baseline or of the
U-shaped split) holds whole cases, in the layout the dataset came in (see :mod:`splitunet.data.layouts`): an MSD
Task01 folder (``dataset.json``, 4D ``imagesTr/``, ``labelsTr/``, as :func:`splitunet.data.phantom.generate_phantom`
writes it) or a BraTS 2021 / 2023 training folder. Cases are read with the bundle's checked NIfTI readers
(:func:`splitunet.data.nifti_io.read_volume`) and each modality is normalised exactly as a split site normalises its
own (:class:`splitunet.data.party_data.ModalityFolder`), so that every topology trains on the same inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from os import PathLike
from pathlib import Path

import numpy as np
from monai.transforms import NormalizeIntensity
from monai.utils import convert_to_numpy

from splitunet.data.labels import get_layout, labels_to_regions
from splitunet.data.layouts import SOURCE_LAYOUTS, SourceCase, find_source_cases
from splitunet.data.nifti_io import load_nifti, read_volume
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.wire.protocol import MODALITIES

__all__ = ["HospitalFolder"]


class HospitalFolder:
    """A hospital's dataset: per case a ``(4, D, H, W)`` image and its ``(3, D, H, W)`` region masks.

    Args:
        data_dir: the hospital's dataset folder in ``layout``.
        layout: ``"msd"``, ``"brats2021"`` or ``"brats2023"``: where the files are and how labels are numbered.
        party: the hospital's name (every error names it).
        max_cached: how many read cases to keep in memory (``None``: all; ``0``: none).

    Attributes:
        party: the hospital's name.
        folder: the dataset folder.
        layout: the layout's name.
        cases: each case's source files, by case ID.

    Raises:
        SplitUNetConfigError: unknown layout (the message names the hospital).
        SplitUNetDataError: missing folder, no cases, a bad ``dataset.json``, a duplicate case, a missing file;
            the message names the hospital, the case and the file.
    """

    def __init__(self, data_dir: str | PathLike, layout: str = "msd", *, party: str, max_cached: int | None = None):
        if layout not in SOURCE_LAYOUTS:
            raise SplitUNetConfigError(f"{party}: unknown dataset layout {layout!r}; expected one of {SOURCE_LAYOUTS}")
        self.party = party
        self.layout = layout
        self._labels = get_layout(layout)
        self.folder = Path(data_dir)
        if not self.folder.is_dir():
            raise SplitUNetDataError("hospital data folder not found (or not a folder)", party=party, file=data_dir)
        try:
            cases = find_source_cases(self.folder, layout)
        except SplitUNetDataError as error:
            # The readers were written for a partition, whose errors name no party; here the hospital is the party.
            raise SplitUNetDataError(error.message, party=party, case=error.case, file=error.file) from error
        self.cases: dict[str, SourceCase] = {case.case: case for case in cases}
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        # Per-volume z-score over the brain (nonzero voxels): what each split site applies to its modality
        # (ModalityFolder), applied here to each modality of a case on its own, so the inputs match to the bit.
        self._normalize = NormalizeIntensity(nonzero=True)

    @property
    def case_ids(self) -> list[str]:
        """The hospital's case IDs, sorted."""
        return sorted(self.cases)

    def read(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """One case as the network sees it (cached, least recently read dropped first).

        Returns:
            ``(image, regions)``: read-only ``float32`` ``(4, D, H, W)``, modalities in ``protocol.MODALITIES``
            order (FLAIR, T1, T1gd, T2), each z-scored over its nonzero voxels; read-only ``uint8``
            ``(3, D, H, W)`` TC/WT/ET masks.

        Raises:
            SplitUNetDataError: unknown case, a missing, empty or corrupt file, NaN/Inf voxels, a label value
                outside the layout, or an image whose shape differs from its label's; the message names the
                hospital, the case and the file.
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

    def shape(self, case_id: str) -> tuple[int, int, int]:
        """Spatial shape ``(D, H, W)`` of a case, from its label file's header (no voxels read) unless cached.

        Raises:
            SplitUNetDataError: unknown case, or a missing or bad label file.
        """
        if case_id in self._cache:
            return tuple(int(s) for s in self._cache[case_id][1].shape[1:])
        label = self._source(case_id).label
        return tuple(int(s) for s in load_nifti(label, party=self.party, case=case_id, ndim=(3,)).shape[:3])

    def _source(self, case_id: str) -> SourceCase:
        try:
            return self.cases[case_id]
        except KeyError:
            raise SplitUNetDataError(
                f"no such case in {self.folder}", party=self.party, case=case_id, file=self.folder
            ) from None

    def _modalities(self, source: SourceCase) -> list[tuple[np.ndarray, Path]]:
        """Each modality's voxels (in ``protocol.MODALITIES`` order) and the file they came from."""
        volumes, opened = [], {}
        for modality in MODALITIES:
            image = source.images[modality]
            if image.path not in opened:
                # MSD keeps the four modalities in one 4D file: read once, take each channel from it.
                ndim, channels = ((3,), None) if image.channel is None else ((4,), image.channels)
                opened[image.path], _, _ = read_volume(
                    image.path, party=self.party, case=source.case, ndim=ndim, channels=channels
                )
            data = opened[image.path]
            volumes.append((data if image.channel is None else data[..., image.channel], image.path))
        return volumes

    def _load(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        source = self._source(case_id)
        labels, _, _ = read_volume(source.label, party=self.party, case=case_id, ndim=(3,))
        regions = labels_to_regions(labels, self._labels, party=self.party, case=case_id, file=source.label)
        channels = []
        for volume, path in self._modalities(source):
            # Checked against the label, one file at a time, so the message names the file on the wrong grid.
            if volume.shape != labels.shape:
                raise SplitUNetDataError(
                    f"image shape {list(volume.shape)} differs from the label shape {list(labels.shape)} "
                    f"({source.label})",
                    party=self.party,
                    case=case_id,
                    file=path,
                )
            channels.append(convert_to_numpy(self._normalize(volume)))
        image = np.ascontiguousarray(np.stack(channels), dtype=np.float32)
        for array in (image, regions):
            array.setflags(write=False)  # shared through the cache: callers must not change them
        return image, regions
