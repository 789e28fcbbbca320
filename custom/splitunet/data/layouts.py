"""Where each case's modalities and labels lie in a centralized MSD or BraTS dataset copy.

A reader turns a dataset folder into a list of :class:`SourceCase`: for every case, which file (and, for MSD's
4D images, which channel) holds each of our modalities, and which file holds the labels. Readers only look at
names and ``dataset.json``; opening and checking the NIfTI files is :mod:`splitunet.data.partition`'s job.

Layouts (docs/design.md, "Labels and layouts"); the modality names are mapped explicitly, never guessed:

========= ================================================ ======= ======= ======= ======= ============
layout    files                                            flair   t1      t1gd    t2      labels
========= ================================================ ======= ======= ======= ======= ============
msd       ``dataset.json``, ``imagesTr/<id>.nii.gz`` (4D)  ch. 0   ch. 1   ch. 2   ch. 3   ``labelsTr``
brats2021 ``<id>/<id>_<suffix>.nii.gz``                    flair   t1      t1ce    t2      seg
brats2023 ``<id>/<id>-<suffix>.nii.gz`` (GLI)              t2f     t1n     t1c     t2w     seg
========= ================================================ ======= ======= ======= ======= ============

BraTS files are found by name anywhere below the dataset folder, so the folder as downloaded (with or without
its top-level folder, one folder per case) and a flat copy both work; the case ID is the file name without the
suffix. The label layout of each dataset (how its label values map to TC/WT/ET) has the same name in
:data:`splitunet.data.labels.LAYOUTS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from splitunet.data.nifti_io import NIFTI_SUFFIXES, nifti_case_id
from splitunet.errors import SplitUNetDataError
from splitunet.wire.protocol import LABELS_PARTY, MODALITIES, MSD_CHANNEL_ORDER

__all__ = [
    "SOURCE_PARTY",
    "BRATS_FILE_NAMES",
    "SOURCE_LAYOUTS",
    "SourceImage",
    "SourceCase",
    "find_source_cases",
]

# Party named in errors about the dataset as a whole, or about a file that feeds several parties (MSD's 4D image).
SOURCE_PARTY = "partition"


@dataclass(frozen=True)
class _BratsNames:
    """How a BraTS release names a case's files: ``<id><separator><suffix>.nii.gz``."""

    separator: str
    modality_suffixes: dict[str, str]
    label_suffix: str = "seg"

    def file_name(self, case: str, suffix: str) -> str:
        return f"{case}{self.separator}{suffix}{NIFTI_SUFFIXES[0]}"


# Our modality name -> the release's file suffix.
BRATS_FILE_NAMES: dict[str, _BratsNames] = {
    "brats2021": _BratsNames("_", {"flair": "flair", "t1": "t1", "t1gd": "t1ce", "t2": "t2"}),
    "brats2023": _BratsNames("-", {"flair": "t2f", "t1": "t1n", "t1gd": "t1c", "t2": "t2w"}),
}
SOURCE_LAYOUTS = ("msd", *BRATS_FILE_NAMES)
_MSD_INDEX = "dataset.json"


@dataclass(frozen=True)
class SourceImage:
    """One modality's volume in the source dataset.

    Attributes:
        path: NIfTI file.
        channel: index of the modality on the 4th axis of a 4D file; ``None`` for a 3D file.
        channels: number of channels the 4D file must have; ``None`` for a 3D file.
    """

    path: Path
    channel: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class SourceCase:
    """Where one case's modalities and labels are.

    Attributes:
        case: case ID, which becomes the file name ``<case>.nii.gz`` in every party folder.
        images: modality (one of ``protocol.MODALITIES``) -> its volume.
        label: label file (3D, in the layout's label numbering).
    """

    case: str
    images: dict[str, SourceImage]
    label: Path


def _channel_name(name: str) -> str:
    # MSD's dataset.json says "FLAIR", "T1w", "t1gd", "T2w"; our modality names are flair, t1, t1gd, t2.
    name = str(name).strip().lower()
    return name[:-1] if name in ("t1w", "t2w") else name


def _read_msd(src: Path, exclude: Path | None) -> list[SourceCase]:
    index_path = src / _MSD_INDEX
    if not index_path.is_file():
        raise SplitUNetDataError(
            f"{_MSD_INDEX} not found; is this an MSD task folder?{_layout_hint(src, 'msd', exclude)}",
            party=SOURCE_PARTY,
            file=index_path,
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise SplitUNetDataError(f"cannot read {_MSD_INDEX}: {e}", party=SOURCE_PARTY, file=index_path) from e

    modalities = index.get("modality")
    if modalities is not None:
        names = tuple(_channel_name(modalities.get(str(i), "")) for i in range(len(modalities)))
        if names != MSD_CHANNEL_ORDER:
            raise SplitUNetDataError(
                f"{_MSD_INDEX} lists channels {list(modalities.values())}, expected the MSD Task01 order "
                f"{list(MSD_CHANNEL_ORDER)}",
                party=SOURCE_PARTY,
                file=index_path,
            )

    entries = index.get("training")
    if not isinstance(entries, list) or not entries:
        raise SplitUNetDataError(f"{_MSD_INDEX} has no 'training' entries", party=SOURCE_PARTY, file=index_path)
    cases: list[SourceCase] = []
    seen: dict[str, int] = {}
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise SplitUNetDataError(
                f"training entry {number} needs 'image' and 'label', got {entry!r}",
                party=SOURCE_PARTY,
                file=index_path,
            )
        image, label = src / entry["image"], src / entry["label"]
        case = nifti_case_id(image)
        if case is None:
            raise SplitUNetDataError(
                f"training entry {number}: image is not a .nii/.nii.gz file", party=SOURCE_PARTY, file=image
            )
        if case in seen:
            raise SplitUNetDataError(
                f"training entries {seen[case]} and {number} are the same case",
                party=SOURCE_PARTY,
                case=case,
                file=index_path,
            )
        seen[case] = number
        channels = len(MSD_CHANNEL_ORDER)
        images = {m: SourceImage(image, channel=c, channels=channels) for c, m in enumerate(MSD_CHANNEL_ORDER)}
        cases.append(SourceCase(case, images, label))
    return cases


def _nifti_files(src: Path, exclude: Path | None):
    """NIfTI files below ``src``, skipping hidden files and folders and the partition's own output."""
    skipped: tuple[str, ...] | None = None
    if exclude is not None and exclude.resolve().is_relative_to(src.resolve()):
        skipped = exclude.resolve().relative_to(src.resolve()).parts
    for path in sorted(src.rglob("*")):
        parts = path.relative_to(src).parts
        # Hidden: macOS "._X.nii.gz" resource forks, ".git", half-written temporary files.
        if any(part.startswith(".") for part in parts):
            continue
        if skipped is not None and parts[: len(skipped)] == skipped:
            continue
        if path.is_file() and nifti_case_id(path) is not None:
            yield path


def _split_brats_name(path: Path, names: _BratsNames) -> tuple[str, str] | None:
    """``(case, role)`` of a BraTS file name (role: a modality or ``LABELS_PARTY``), or ``None``."""
    stem = nifti_case_id(path)
    roles = {**{suffix: m for m, suffix in names.modality_suffixes.items()}, names.label_suffix: LABELS_PARTY}
    for suffix, role in roles.items():
        # No suffix of one release ends another of its suffixes ("_t1" vs "_t1ce"), so at most one matches.
        ending = f"{names.separator}{suffix}"
        if stem.endswith(ending) and len(stem) > len(ending):
            return stem[: -len(ending)], role
    return None


def _read_brats(src: Path, layout: str, exclude: Path | None) -> list[SourceCase]:
    names = BRATS_FILE_NAMES[layout]
    found: dict[str, dict[str, Path]] = {}
    for path in _nifti_files(src, exclude):
        parsed = _split_brats_name(path, names)
        if parsed is None:
            continue
        case, role = parsed
        files = found.setdefault(case, {})
        other = files.get(role)
        if other is not None and other.parent != path.parent:
            # The same case in two folders: a release copied or merged into the dataset twice.
            raise SplitUNetDataError(
                f"duplicate case ID: two folders hold this case: {other.parent} and {path.parent}",
                party=SOURCE_PARTY,
                case=case,
                file=path,
            )
        if other is not None:
            raise SplitUNetDataError(
                f"two files hold the {role} of this case: {other.name} and {path.name}",
                party=role,
                case=case,
                file=path,
            )
        files[role] = path
    if not found:
        example = names.file_name("<id>", names.modality_suffixes["flair"])
        raise SplitUNetDataError(
            f"no {layout} cases found (files named like <id>/{example}).{_layout_hint(src, layout, exclude)}",
            party=SOURCE_PARTY,
            file=src,
        )

    cases: list[SourceCase] = []
    for case, files in sorted(found.items()):
        folders = sorted({path.parent for path in files.values()})
        if len(folders) > 1:
            # Files of one case strewn over folders: most likely two partial copies of it.
            raise SplitUNetDataError(
                f"duplicate case ID: its files lie in several folders: {', '.join(map(str, folders))}",
                party=SOURCE_PARTY,
                case=case,
                file=folders[1],
            )
        folder = folders[0]
        for role in (*MODALITIES, LABELS_PARTY):
            if role not in files:
                suffix = names.label_suffix if role == LABELS_PARTY else names.modality_suffixes[role]
                raise SplitUNetDataError(
                    f"{role} file missing for this case (found {', '.join(sorted(p.name for p in files.values()))})",
                    party=role,
                    case=case,
                    file=folder / names.file_name(case, suffix),
                )
        cases.append(SourceCase(case, {m: SourceImage(files[m]) for m in MODALITIES}, files[LABELS_PARTY]))
    return cases


def _layout_hint(src: Path, layout: str, exclude: Path | None) -> str:
    """A sentence naming another layout the folder looks like, or ``""``; only called on the way to an error."""
    if layout != "msd" and (src / _MSD_INDEX).is_file():
        return f" The folder holds {_MSD_INDEX}, as an MSD task does: use --layout msd."
    for other, names in BRATS_FILE_NAMES.items():
        if other != layout and any(_split_brats_name(p, names) for p in _nifti_files(src, exclude)):
            return f" Its files are named as in {other}: use --layout {other}."
    return ""


def find_source_cases(src: str | Path, layout: str, *, exclude: str | Path | None = None) -> list[SourceCase]:
    """List the cases of a centralized dataset copy, with the file of each modality and of the labels.

    Args:
        src: dataset folder: an MSD task folder (with ``dataset.json``) or a BraTS training-data folder.
        layout: one of :data:`SOURCE_LAYOUTS`.
        exclude: a folder below ``src`` to ignore (the partition's output, if the user put it there).

    Returns:
        the cases: in ``dataset.json`` order for MSD, sorted by case ID for BraTS.

    Raises:
        SplitUNetDataError: missing or bad ``dataset.json``; no cases (empty dataset, or another layout's file
            names); a duplicate case ID; a case without one of its modality files or its label file. The message
            names the case and the file (for a missing file, the name it was expected under).
        ValueError: unknown layout.
    """
    src = Path(src)
    exclude = None if exclude is None else Path(exclude)
    if layout == "msd":
        return _read_msd(src, exclude)
    if layout in BRATS_FILE_NAMES:
        return _read_brats(src, layout, exclude)
    raise ValueError(f"unknown dataset layout {layout!r}; known layouts: {', '.join(SOURCE_LAYOUTS)}")
