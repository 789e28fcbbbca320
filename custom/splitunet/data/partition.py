"""Split a centralized MSD or BraTS dataset copy into one folder per party: one per modality, one for the labels.

Vertical split learning needs each site to hold one modality of the same patients and the server to hold the
labels. Whatever the source layout (see :mod:`splitunet.data.layouts`), this module writes::

    out/flair/<case>.nii.gz   out/t1/...   out/t1gd/...   out/t2/...   (3D, the source affine and header)
    out/labels/<case>.nii.gz                                           (3D uint8, the source label numbering)
    out/<party>/party.json    {"party_kind", "modality", "layout", "cases"}

Labels are copied in their dataset's own numbering, never remapped; ``party.json`` records the layout, and the
label holder's :class:`~splitunet.data.party_data.LabelFolder` refuses to read them under another one.

Every case is checked before any of its files is written, every file is written atomically, and the
``party.json`` files are removed first and written last, so a partition that stopped half-way has none.
"""

from __future__ import annotations

import json
import zlib
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from tqdm import tqdm

from splitunet.atomic_files import write_json_atomic
from splitunet.data.labels import validate_labels
from splitunet.data.layouts import SOURCE_LAYOUTS, SOURCE_PARTY, SourceCase, find_source_cases
from splitunet.data.nifti_io import load_nifti, nifti_case_id, save_nifti_atomic
from splitunet.errors import SplitUNetDataError
from splitunet.wire.protocol import LABELS_PARTY, MODALITIES

__all__ = ["AFFINE_ATOL", "PARTY_FILE", "partition", "partition_msd", "read_partition_layout"]

# Largest difference (mm) between the affines of one case's files that still counts as the same grid.
AFFINE_ATOL = 1e-3
# Description written beside each party's case files. party_data.PARTY_FILE, which reads it, has the same value
# (a test holds this); it is not imported from there because party_data pulls in MONAI, seconds of start-up.
PARTY_FILE = "party.json"


class _OpenFile(NamedTuple):
    """A source file of a case, opened and checked, with what error messages call it."""

    party: str
    role: str
    img: nib.Nifti1Image
    channels: int | None


def _check_no_foreign_cases(folder: Path, cases: set[str]) -> None:
    # A party folder is read as "every NIfTI in it"; old cases left from another partition would join silently.
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        case = nifti_case_id(path)
        if case is not None and not path.name.startswith(".") and case not in cases:
            raise SplitUNetDataError(
                "output folder holds a case that is not in this dataset; use an empty output folder",
                party=folder.name,
                case=case,
                file=path,
            )


def _read_data(img, party: str, case: str, path: Path) -> np.ndarray:
    # Scaled voxels in the smallest faithful dtype (no float64 copy of a float32 image); truncated gzip shows here.
    try:
        return np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise SplitUNetDataError(
            f"cannot read voxel data: {type(e).__name__}: {e}", party=party, case=case, file=path
        ) from e


def _check_same_grid(case: str, files: dict[Path, _OpenFile]) -> None:
    """All files of a case on one voxel grid: same spatial shape, affines within :data:`AFFINE_ATOL`."""
    (ref_path, ref), *others = files.items()
    ref_shape = tuple(ref.img.shape[:3])
    for path, file in others:
        where = {"party": file.party, "case": case, "file": path}
        if tuple(file.img.shape[:3]) != ref_shape:
            raise SplitUNetDataError(
                f"{file.role} shape {list(file.img.shape[:3])} differs from the {ref.role} shape {list(ref_shape)} "
                f"({ref_path})",
                **where,
            )
        if not np.allclose(file.img.affine, ref.img.affine, rtol=0.0, atol=AFFINE_ATOL):
            raise SplitUNetDataError(
                f"{file.role} affine differs from the {ref.role} affine (tolerance {AFFINE_ATOL} mm; {ref_path}):\n"
                f"{file.role}:\n{file.img.affine}\n{ref.role}:\n{ref.img.affine}",
                **where,
            )


def _read_case(source: SourceCase, layout: str) -> tuple[dict, tuple]:
    """Open, check and read every file of a case; nothing is written, so a bad case leaves no files behind.

    Returns:
        ``({modality: (volume, affine, header)}, (labels, affine, header))``.
    """
    case = source.case
    # Each file once (MSD's four modalities share one 4D file), named by the party it feeds, if only one.
    files: dict[Path, _OpenFile] = {}
    for modality, image in source.images.items():
        if image.path in files:
            continue
        shared = sum(other.path == image.path for other in source.images.values()) > 1
        party = SOURCE_PARTY if shared else modality
        # in_memory: decompress whole files so gzip's CRC catches corruption before it is copied to a site.
        img = load_nifti(
            image.path,
            party=party,
            case=case,
            ndim=(3,) if image.channels is None else (4,),
            channels=image.channels,
            in_memory=True,
        )
        files[image.path] = _OpenFile(party, "image" if shared else f"{modality} image", img, image.channels)
    label_img = load_nifti(source.label, party=LABELS_PARTY, case=case, ndim=(3,), in_memory=True)
    files[source.label] = _OpenFile(LABELS_PARTY, "label", label_img, None)
    _check_same_grid(case, files)

    spatial = tuple(label_img.shape[:3])
    data: dict[Path, np.ndarray] = {}
    for path, file in files.items():
        voxels = _read_data(file.img, file.party, case, path)
        # Trailing length-1 axes (a 3D volume stored as D x H x W x 1) carry no data.
        voxels = voxels.reshape(spatial if file.channels is None else (*spatial, file.channels))
        if path == source.label:
            voxels = validate_labels(voxels, layout, party=file.party, case=case, file=path)
        else:
            bad_voxels = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
            if bad_voxels:
                raise SplitUNetDataError(
                    f"{bad_voxels} image voxels are not finite (NaN or Inf)", party=file.party, case=case, file=path
                )
        data[path] = voxels

    volumes = {}
    for modality, image in source.images.items():
        voxels = data[image.path] if image.channel is None else data[image.path][..., image.channel]
        file = files[image.path]
        volumes[modality] = (np.ascontiguousarray(voxels), file.img.affine, file.img.header)
    return volumes, (data[source.label], label_img.affine, label_img.header)


def partition(src: str | PathLike, out: str | PathLike, layout: str = "msd", *, progress: bool = True) -> dict:
    """Write one folder per modality and one for the labels from a centralized dataset copy.

    Args:
        src: dataset folder in ``layout`` (see :mod:`splitunet.data.layouts`): an MSD task folder with
            ``dataset.json``, ``imagesTr/`` (4D) and ``labelsTr/``, or a BraTS 2021 / 2023 GLI training folder
            with one folder of per-modality files per case.
        out: output root; party folders ``out/<modality>`` (``protocol.MODALITIES``) and ``out/labels`` are
            created in it. May lie inside ``src``.
        layout: one of ``"msd"``, ``"brats2021"``, ``"brats2023"``; also the label layout recorded in every
            ``party.json`` and checked against each label volume.
        progress: show a tqdm progress bar.

    Returns:
        ``{"source": str, "out": str, "layout": str, "cases": [...], "parties": {party: folder}}``.

    Raises:
        SplitUNetDataError: the dataset's problems (see :func:`~splitunet.data.layouts.find_source_cases`:
            no cases, a duplicate case ID, a missing modality or label file); a missing, empty (0 bytes) or
            corrupt file; an image with the wrong number of dimensions or channels; files of one case with other
            spatial shapes or affines; NaN/Inf image voxels; label values outside the layout; an output folder
            that already holds other cases. The message names the party, the case and the file.
        ValueError: unknown layout.
    """
    if layout not in SOURCE_LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; known layouts: {', '.join(SOURCE_LAYOUTS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise SplitUNetDataError("source folder not found", party=SOURCE_PARTY, file=src)
    cases = find_source_cases(src, layout, exclude=out)
    case_ids = [source.case for source in cases]
    party_dirs = {name: out / name for name in (*MODALITIES, LABELS_PARTY)}
    for folder in party_dirs.values():
        _check_no_foreign_cases(folder, set(case_ids))
    for folder in party_dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
        # A re-run that fails must not leave the previous run's party.json vouching for a mix of both runs.
        (folder / PARTY_FILE).unlink(missing_ok=True)

    for source in tqdm(cases, desc="partition", unit="case", disable=not progress):
        volumes, (labels, label_affine, label_header) = _read_case(source, layout)
        for modality, (volume, affine, header) in volumes.items():
            # The source header keeps units, orientation codes and description; the image class sets the 3D shape.
            save_nifti_atomic(volume, affine, party_dirs[modality] / f"{source.case}.nii.gz", header=header)
        save_nifti_atomic(labels, label_affine, party_dirs[LABELS_PARTY] / f"{source.case}.nii.gz", header=label_header)

    for name, folder in party_dirs.items():
        is_labels = name == LABELS_PARTY
        write_json_atomic(
            {
                "party_kind": "labels" if is_labels else "modality",
                "modality": None if is_labels else name,
                "layout": layout,
                "cases": case_ids,
            },
            folder / PARTY_FILE,
        )
    return {
        "source": str(src),
        "out": str(out),
        "layout": layout,
        "cases": case_ids,
        "parties": {name: str(folder) for name, folder in party_dirs.items()},
    }


def partition_msd(src: str | PathLike, out: str | PathLike, *, progress: bool = True) -> dict:
    """:func:`partition` of an MSD Task01 dataset (``layout="msd"``)."""
    return partition(src, out, "msd", progress=progress)


def read_partition_layout(partition_dir: str | PathLike) -> str:
    """Label layout a partition recorded for its labels, so later steps need not be told it again.

    Args:
        partition_dir: output of :func:`partition` (its root, or its ``labels`` folder).

    Returns:
        the layout name from ``labels/party.json`` (e.g. ``"brats2021"``).

    Raises:
        SplitUNetDataError: no readable ``party.json`` of a label folder (not a partition, or one that stopped
            half-way).
    """
    folder = Path(partition_dir)
    if not (folder / PARTY_FILE).is_file() and (folder / LABELS_PARTY).is_dir():
        folder = folder / LABELS_PARTY
    path = folder / PARTY_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SplitUNetDataError(
            f"cannot read the partition's {PARTY_FILE} (not a partition, or one that did not finish): {e}",
            party=LABELS_PARTY,
            file=path,
        ) from e
    if not isinstance(info, dict) or info.get("party_kind") != "labels" or not isinstance(info.get("layout"), str):
        raise SplitUNetDataError(
            f"{PARTY_FILE} does not describe a label folder with a layout", party=LABELS_PARTY, file=path
        )
    return info["layout"]
