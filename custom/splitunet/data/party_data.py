"""Each party's view of its own data folder: a site's one modality, the server's labels.

A folder holds one file per case, ``<case>.nii.gz`` or ``<case>.nii``; the case ID is the file name without the
suffix. The folders written by ``splitunet partition`` (``out/flair``, ``out/labels``, ...) are such folders; the
partition root itself (``out``) is accepted too and the party's sub-folder is used.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import NormalizeIntensity
from monai.utils import convert_to_numpy

from splitunet.data.labels import LabelLayout, get_layout, labels_to_regions, validate_labels
from splitunet.data.nifti_io import affine_digest, load_nifti, nifti_case_id, read_volume
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.wire.protocol import LABELS_PARTY, MODALITIES

__all__ = ["PARTY_FILE", "ModalityFolder", "LabelFolder"]

# Description a partition writes beside the case files (see splitunet.data.partition).
PARTY_FILE = "party.json"


class _CaseFolder:
    """Lists ``<case>.nii[.gz]`` files and caches what was read from them (LRU, optional bound)."""

    def __init__(self, folder: str | PathLike, subfolder: str, party: str, max_cached: int | None):
        self.party = party
        self.folder = self._resolve(Path(folder), subfolder)
        self.files = self._list_cases()
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._described: dict[str, dict] = {}

    def _resolve(self, folder: Path, subfolder: str) -> Path:
        if not folder.is_dir():
            raise SplitUNetDataError("data folder not found (or not a folder)", party=self.party, file=folder)
        # A partition root has no case files itself, only one sub-folder per party.
        if (folder / subfolder).is_dir() and not any(nifti_case_id(p) for p in folder.iterdir() if p.is_file()):
            return folder / subfolder
        return folder

    def _list_cases(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for path in sorted(self.folder.iterdir()):
            # Hidden files: macOS "._X.nii.gz" resource forks and half-written temporary files.
            if path.name.startswith(".") or not path.is_file():
                continue
            case_id = nifti_case_id(path)
            if case_id is None:
                continue
            if case_id in files:
                raise SplitUNetDataError(
                    f"two files for the same case: {files[case_id].name} and {path.name}",
                    party=self.party,
                    case=case_id,
                    file=path,
                )
            files[case_id] = path
        if not files:
            raise SplitUNetDataError("data folder has no .nii or .nii.gz files", party=self.party, file=self.folder)
        return files

    def _read_party_file(self) -> dict | None:
        path = self.folder / PARTY_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SplitUNetDataError(f"cannot read {PARTY_FILE}: {e}", party=self.party, file=path) from e

    @property
    def case_ids(self) -> list[str]:
        """Case IDs in this folder, sorted."""
        return sorted(self.files)

    def path(self, case_id: str) -> Path:
        """File of a case."""
        try:
            return self.files[case_id]
        except KeyError:
            raise SplitUNetDataError(
                f"no file for this case in {self.folder}", party=self.party, case=case_id, file=self.folder
            ) from None

    def describe(self, case_id: str) -> dict:
        """``{"shape": [D, H, W], "affine_digest": str}`` from the header alone: what the server may learn."""
        if case_id not in self._described:
            path = self.path(case_id)
            img = load_nifti(path, party=self.party, case=case_id, ndim=(3,))
            shape = [int(s) for s in img.shape[:3]]
            self._described[case_id] = {"shape": shape, "affine_digest": affine_digest(img.affine, shape)}
        return dict(self._described[case_id])

    def header(self, case_id: str) -> nib.Nifti1Header:
        """A copy of a case's NIfTI header (read without the voxels)."""
        path = self.path(case_id)
        return load_nifti(path, party=self.party, case=case_id, ndim=(3,)).header.copy()

    def _cached(self, key: str, load):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = load()
        if self.max_cached != 0:
            self._cache[key] = value
            if self.max_cached is not None:
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        return value


def _frozen(array: np.ndarray) -> np.ndarray:
    # Cached arrays are shared between calls, so callers must not change them in place.
    array.setflags(write=False)
    return array


class ModalityFolder(_CaseFolder):
    """A site's folder of one modality's 3D volumes, read and intensity-normalised at the site.

    Args:
        data_dir: folder of ``<case>.nii[.gz]`` files, or a partition root holding ``<modality>/``.
        modality: one of ``protocol.MODALITIES``.
        party: this site's name (for error messages).
        max_cached: how many normalised volumes to keep in memory (``None``: all; ``0``: none).

    Raises:
        SplitUNetConfigError: unknown modality.
        SplitUNetDataError: missing or empty folder, two files for one case, or a ``party.json`` that says the
            folder holds another modality.
    """

    def __init__(self, data_dir: str | PathLike, modality: str, *, party: str, max_cached: int | None = None):
        if modality not in MODALITIES:
            raise SplitUNetConfigError(f"{party}: unknown modality {modality!r}; expected one of {MODALITIES}")
        self.modality = modality
        super().__init__(data_dir, modality, party, max_cached)
        info = self._read_party_file()
        if info is not None and (info.get("party_kind") != "modality" or info.get("modality") != modality):
            raise SplitUNetDataError(
                f"folder holds {info.get('party_kind')} {info.get('modality')!r}, but this site is set up for "
                f"modality {modality!r}",
                party=party,
                file=self.folder / PARTY_FILE,
            )
        # Per-volume z-score over the brain (nonzero voxels), as in the MONAI BraTS recipes; done here, at the
        # site, because only the site sees the intensities.
        self._normalize = NormalizeIntensity(nonzero=True)

    def read(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Normalised volume and affine of a case.

        Returns:
            ``(volume, affine)``: read-only ``float32`` ``(D, H, W)`` and the 4x4 affine.

        Raises:
            SplitUNetDataError: unknown case or a bad file (see :func:`~splitunet.data.nifti_io.read_volume`).
        """

        def load():
            path = self.path(case_id)
            data, affine, _ = read_volume(path, party=self.party, case=case_id, ndim=(3,))
            # MONAI returns a MetaTensor even for numpy input; the cache holds plain arrays.
            volume = np.ascontiguousarray(convert_to_numpy(self._normalize(data)), dtype=np.float32)
            return _frozen(volume), _frozen(affine)

        return self._cached(case_id, load)


class LabelFolder(_CaseFolder):
    """The label holder's folder of label volumes.

    Args:
        labels_dir: folder of ``<case>.nii[.gz]`` label files, or a partition root holding ``labels/``.
        layout: label layout name or :class:`~splitunet.data.labels.LabelLayout` (default MSD Task01).
        party: the label holder's name (for error messages).
        max_cached: how many region volumes to keep in memory (``None``: all; ``0``: none).

    Raises:
        SplitUNetDataError: missing or empty folder, two files for one case, or a ``party.json`` that says the
            folder is not a label folder or uses another layout.
    """

    def __init__(
        self,
        labels_dir: str | PathLike,
        layout: str | LabelLayout = "msd",
        *,
        party: str = "server",
        max_cached: int | None = None,
    ):
        try:
            self.layout = get_layout(layout)
        except ValueError as e:
            raise SplitUNetConfigError(f"{party}: {e}") from None
        super().__init__(labels_dir, LABELS_PARTY, party, max_cached)
        info = self._read_party_file()
        if info is not None and (info.get("party_kind") != "labels" or info.get("layout") != self.layout.name):
            raise SplitUNetDataError(
                f"folder holds {info.get('party_kind')} in layout {info.get('layout')!r}, but labels in layout "
                f"{self.layout.name!r} were expected",
                party=party,
                file=self.folder / PARTY_FILE,
            )

    def read_labels(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Label volume of a case in the layout's numbering, checked.

        Returns:
            ``(labels, affine)``: ``uint8`` ``(D, H, W)`` and the 4x4 affine.
        """
        path = self.path(case_id)
        data, affine, _ = read_volume(path, party=self.party, case=case_id, ndim=(3,))
        return validate_labels(data, self.layout, party=self.party, case=case_id, file=path), affine

    def read(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Region masks and affine of a case.

        Returns:
            ``(regions, affine)``: read-only ``uint8`` ``(3, D, H, W)`` in ``protocol.REGIONS`` order (TC, WT, ET)
            and the 4x4 affine.
        """

        def load():
            path = self.path(case_id)
            data, affine, _ = read_volume(path, party=self.party, case=case_id, ndim=(3,))
            regions = labels_to_regions(data, self.layout, party=self.party, case=case_id, file=path)
            return _frozen(regions), _frozen(affine)

        return self._cached(case_id, load)
