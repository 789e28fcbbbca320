"""Split an MSD Task01_BrainTumour dataset into one folder per party: one per modality, one for the labels.

Vertical split learning needs each site to hold one modality of the same patients and the server to hold the
labels. MSD stores the four modalities as channels of one 4D NIfTI, so this module writes::

    out/flair/<case>.nii.gz   out/t1/...   out/t1gd/...   out/t2/...   (3D, the source affine)
    out/labels/<case>.nii.gz                                           (3D uint8, MSD label numbering)
    out/<party>/party.json    {"party_kind", "modality", "layout", "cases"}

Every case is checked before any of its files is written, every file is written atomically, and the
``party.json`` files are written last, so a partition that stopped half-way has none.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from os import PathLike
from pathlib import Path

import numpy as np
from tqdm import tqdm

from splitunet.data.nifti_io import load_nifti, nifti_case_id, save_nifti_atomic
from splitunet.errors import SplitUNetDataError
from splitunet.labels import validate_labels
from splitunet.protocol import LABELS_PARTY, MSD_CHANNEL_ORDER

__all__ = ["AFFINE_ATOL", "partition_msd"]

# Largest difference (mm) between the image and label affines of one case that still counts as the same grid.
AFFINE_ATOL = 1e-3
_PARTY = "partition"
_LAYOUT = "msd"


def _channel_name(name: str) -> str:
    # MSD's dataset.json says "FLAIR", "T1w", "t1gd", "T2w"; our modality names are flair, t1, t1gd, t2.
    name = str(name).strip().lower()
    return name[:-1] if name in ("t1w", "t2w") else name


def _read_index(src: Path) -> tuple[list[tuple[str, Path, Path]], Path]:
    index_path = src / "dataset.json"
    if not index_path.is_file():
        raise SplitUNetDataError("dataset.json not found; is this an MSD task folder?", party=_PARTY, file=index_path)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise SplitUNetDataError(f"cannot read dataset.json: {e}", party=_PARTY, file=index_path) from e

    modalities = index.get("modality")
    if modalities is not None:
        names = tuple(_channel_name(modalities.get(str(i), "")) for i in range(len(modalities)))
        if names != MSD_CHANNEL_ORDER:
            raise SplitUNetDataError(
                f"dataset.json lists channels {list(modalities.values())}, expected the MSD Task01 order "
                f"{list(MSD_CHANNEL_ORDER)}",
                party=_PARTY,
                file=index_path,
            )

    entries = index.get("training")
    if not isinstance(entries, list) or not entries:
        raise SplitUNetDataError("dataset.json has no 'training' entries", party=_PARTY, file=index_path)
    cases: list[tuple[str, Path, Path]] = []
    seen: dict[str, int] = {}
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise SplitUNetDataError(
                f"training entry {number} needs 'image' and 'label', got {entry!r}", party=_PARTY, file=index_path
            )
        image, label = src / entry["image"], src / entry["label"]
        case = nifti_case_id(image)
        if case is None:
            raise SplitUNetDataError(
                f"training entry {number}: image is not a .nii/.nii.gz file", party=_PARTY, file=image
            )
        if case in seen:
            raise SplitUNetDataError(
                f"training entries {seen[case]} and {number} are the same case",
                party=_PARTY,
                case=case,
                file=index_path,
            )
        seen[case] = number
        cases.append((case, image, label))
    return cases, index_path


def _check_no_foreign_cases(folder: Path, cases: set[str]) -> None:
    # A party folder is read as "every NIfTI in it"; old cases left from another partition would join silently.
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        case = nifti_case_id(path)
        if case is not None and not path.name.startswith(".") and case not in cases:
            raise SplitUNetDataError(
                "output folder holds a case that is not in this dataset; use an empty output folder",
                party=_PARTY,
                case=case,
                file=path,
            )


def _read_data(img, case: str, path: Path) -> np.ndarray:
    # Scaled voxels in the smallest faithful dtype (no float64 copy of a float32 image); truncated gzip shows here.
    try:
        return np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise SplitUNetDataError(
            f"cannot read voxel data: {type(e).__name__}: {e}", party=_PARTY, case=case, file=path
        ) from e


def _write_json_atomic(data: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def partition_msd(src: str | PathLike, out: str | PathLike, *, progress: bool = True) -> dict:
    """Write one folder per modality and one for the labels from an MSD Task01 dataset.

    Args:
        src: MSD task folder with ``dataset.json``, ``imagesTr/`` (4D, channels in ``protocol.MSD_CHANNEL_ORDER``)
            and ``labelsTr/`` (3D).
        out: output root; party folders ``out/<modality>`` and ``out/labels`` are created in it.
        progress: show a tqdm progress bar.

    Returns:
        ``{"source": str, "out": str, "layout": "msd", "cases": [...], "parties": {party: folder}}``.

    Raises:
        SplitUNetDataError: missing or bad ``dataset.json``; a case whose image is not 4D with 4 channels, whose
            label is not 3D, has another spatial shape or affine than the image, or holds values outside the MSD
            layout; an output folder that already holds other cases. The message names the case and the file.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise SplitUNetDataError("source folder not found", party=_PARTY, file=src)
    cases, _ = _read_index(src)
    case_ids = [case for case, _, _ in cases]
    party_dirs = {name: out / name for name in (*MSD_CHANNEL_ORDER, LABELS_PARTY)}
    for folder in party_dirs.values():
        _check_no_foreign_cases(folder, set(case_ids))
        folder.mkdir(parents=True, exist_ok=True)

    for case, image_path, label_path in tqdm(cases, desc="partition", unit="case", disable=not progress):
        # in_memory: decompress whole files so gzip's CRC catches corruption before it is copied to every site.
        image = load_nifti(
            image_path, party=_PARTY, case=case, ndim=(4,), channels=len(MSD_CHANNEL_ORDER), in_memory=True
        )
        label_img = load_nifti(label_path, party=_PARTY, case=case, ndim=(3,), in_memory=True)
        spatial = tuple(image.shape[:3])
        if tuple(label_img.shape[:3]) != spatial:
            raise SplitUNetDataError(
                f"label shape {list(label_img.shape[:3])} differs from image spatial shape {list(spatial)}",
                party=_PARTY,
                case=case,
                file=label_path,
            )
        if not np.allclose(label_img.affine, image.affine, rtol=0.0, atol=AFFINE_ATOL):
            raise SplitUNetDataError(
                f"label affine differs from the image affine (tolerance {AFFINE_ATOL} mm):\n"
                f"label:\n{label_img.affine}\nimage:\n{image.affine}",
                party=_PARTY,
                case=case,
                file=label_path,
            )
        # Read everything before writing anything, so a bad case leaves no partial set of files behind.
        channels = _read_data(image, case, image_path)
        labels = _read_data(label_img, case, label_path)
        channels = channels.reshape(*spatial, len(MSD_CHANNEL_ORDER))
        labels = validate_labels(labels.reshape(spatial), _LAYOUT, party=_PARTY, case=case, file=label_path)
        bad_voxels = int(channels.size - np.count_nonzero(np.isfinite(channels)))
        if bad_voxels:
            raise SplitUNetDataError(
                f"{bad_voxels} image voxels are not finite (NaN or Inf)", party=_PARTY, case=case, file=image_path
            )

        for channel, modality in enumerate(MSD_CHANNEL_ORDER):
            # The source header keeps units, orientation codes and description; the image class sets the 3D shape.
            save_nifti_atomic(
                np.ascontiguousarray(channels[..., channel]),
                image.affine,
                party_dirs[modality] / f"{case}.nii.gz",
                header=image.header,
            )
        save_nifti_atomic(
            labels, label_img.affine, party_dirs[LABELS_PARTY] / f"{case}.nii.gz", header=label_img.header
        )

    for name, folder in party_dirs.items():
        is_labels = name == LABELS_PARTY
        _write_json_atomic(
            {
                "party_kind": "labels" if is_labels else "modality",
                "modality": None if is_labels else name,
                "layout": _LAYOUT,
                "cases": case_ids,
            },
            folder / "party.json",
        )
    return {
        "source": str(src),
        "out": str(out),
        "layout": _LAYOUT,
        "cases": case_ids,
        "parties": {name: str(folder) for name, folder in party_dirs.items()},
    }
