"""NIfTI reading and writing that fails with the party, case and file named.

A site administrator who sees "EOFError: Compressed file ended before the end-of-stream marker was reached" from
deep inside nibabel cannot tell which of 500 files is broken; every problem here is re-raised as a
:class:`~splitunet.errors.SplitUNetDataError` that says which file, which case and which party.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import zlib
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from splitunet.atomic_files import atomic_path
from splitunet.errors import SplitUNetDataError

__all__ = [
    "NIFTI_SUFFIXES",
    "nifti_case_id",
    "load_nifti",
    "read_volume",
    "save_nifti_atomic",
    "affine_digest",
    "geometry_header",
    "header_from_geometry",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_GZIP_MAGIC = b"\x1f\x8b"

# What nibabel, gzip and zlib raise for unreadable, truncated or corrupt files.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)

# Free-text header fields that may hold what a scanner or a person typed (names, dates, protocol notes).
_FREE_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")

# An affine whose determinant is this small (mm^3 per voxel) cannot map voxels to space.
_SINGULAR_DET = 1e-6


def nifti_case_id(path: str | PathLike) -> str | None:
    """Case ID of a NIfTI file name (the name without ``.nii.gz`` / ``.nii``), or ``None`` if not NIfTI."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _effective_shape(shape: Sequence[int]) -> tuple[int, ...]:
    # Some writers store a 3D volume as (D, H, W, 1) or (D, H, W, 1, 1); trailing length-1 axes beyond the
    # third carry no data, so they do not count against the expected number of dimensions.
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_nifti(
    path: str | PathLike,
    *,
    party: str | None,
    case: str | None = None,
    ndim: Sequence[int] = (3,),
    channels: int | None = None,
    in_memory: bool = False,
) -> nib.Nifti1Image:
    """Open a NIfTI file and check its header; voxel data stay on disk unless ``in_memory``.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        party: party that reads the file (for error messages).
        case: case ID (for error messages).
        ndim: allowed numbers of dimensions, e.g. ``(3,)`` for a volume, ``(4,)`` for an MSD multi-channel image.
            Trailing length-1 axes beyond the third are not counted.
        channels: if given, the required length of the 4th axis of a 4D image.
        in_memory: read the whole file now. For ``.nii.gz`` this decompresses the full stream, so gzip's CRC and
            length check catch corruption; a lazy read stops after the voxels and never sees the checksum, so a
            damaged deflate stream can decode to wrong voxels without an error.

    Returns:
        the image (nibabel ``Nifti1Image`` or ``Nifti2Image``); its data not yet read unless ``in_memory``.

    Raises:
        SplitUNetDataError: missing, empty or unreadable file; wrong number of dimensions or channels;
            non-finite or singular affine.
    """
    path = Path(path)
    where = {"party": party, "case": case, "file": path}
    if not path.exists():
        raise SplitUNetDataError("file not found", **where)
    if not path.is_file():
        raise SplitUNetDataError("not a regular file", **where)
    if path.stat().st_size == 0:
        raise SplitUNetDataError("file is empty (0 bytes)", **where)
    try:
        img = nib.load(path)
        if in_memory:
            raw = path.read_bytes()
            if raw[:2] == _GZIP_MAGIC:
                raw = gzip.decompress(raw)
            img = type(img).from_bytes(raw)
        shape = img.shape
        affine = img.affine
    except _READ_ERRORS as e:
        raise SplitUNetDataError(f"cannot read NIfTI file: {type(e).__name__}: {e}", **where) from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise SplitUNetDataError(f"not a NIfTI image (nibabel read it as {type(img).__name__})", **where)

    shape = _effective_shape(shape)
    allowed = tuple(int(n) for n in ndim)
    if len(shape) not in allowed:
        raise SplitUNetDataError(
            f"image has {len(shape)} dimensions {list(shape)}, expected {' or '.join(map(str, allowed))}", **where
        )
    if channels is not None and len(shape) == 4 and shape[3] != channels:
        raise SplitUNetDataError(f"4D image has {shape[3]} channels {list(shape)}, expected {channels}", **where)
    if min(shape, default=0) < 1:
        raise SplitUNetDataError(f"image has an empty axis {list(shape)}", **where)

    if affine is None or not np.all(np.isfinite(affine)):
        raise SplitUNetDataError(f"affine is not finite:\n{affine}", **where)
    if abs(np.linalg.det(affine[:3, :3])) < _SINGULAR_DET:
        raise SplitUNetDataError(f"affine is singular (zero voxel volume):\n{affine}", **where)
    return img


def read_volume(
    path: str | PathLike,
    *,
    party: str | None,
    case: str | None = None,
    ndim: Sequence[int] = (3,),
    channels: int | None = None,
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI file's voxels, affine and header, all checked.

    Args:
        path, party, case, ndim, channels: as for :func:`load_nifti`.
        dtype: floating type of the returned voxels (scaling from the header is applied).

    Returns:
        ``(data, affine, header)``: voxels ``(D, H, W)`` or ``(D, H, W, C)`` as ``dtype`` (trailing length-1 axes
        beyond the third dropped), the 4x4 voxel-to-world affine (float64), and a copy of the header.

    Raises:
        SplitUNetDataError: as :func:`load_nifti`, plus truncated/corrupt voxel data (gzip CRC checked) and
            NaN/Inf voxels.
    """
    img = load_nifti(path, party=party, case=case, ndim=ndim, channels=channels, in_memory=True)
    where = {"party": party, "case": case, "file": Path(path)}
    try:
        data = img.get_fdata(dtype=dtype, caching="unchanged")
    except _READ_ERRORS as e:
        raise SplitUNetDataError(f"cannot read voxel data: {type(e).__name__}: {e}", **where) from e
    data = data.reshape(_effective_shape(data.shape))
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise SplitUNetDataError(f"{bad} of {data.size} voxels are not finite (NaN or Inf)", **where)
    return data, np.array(img.affine, dtype=np.float64), img.header.copy()


def save_nifti_atomic(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | PathLike,
    header: nib.Nifti1Header | None = None,
) -> Path:
    """Write a NIfTI file so that the final name only ever holds a complete file.

    The image is written to a hidden temporary file beside it and renamed over the final name
    (:func:`splitunet.atomic_files.atomic_path`); a failed write leaves the previous file.

    Args:
        array: voxels; their dtype becomes the file's data type.
        affine: 4x4 voxel-to-world affine.
        path: final ``.nii`` or ``.nii.gz`` path (the suffix picks compression).
        header: header to start from (e.g. the source image's); shape and data type are set from ``array``.

    Returns:
        the final path.
    """
    path = Path(path)
    suffix = next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"NIfTI path must end with {' or '.join(NIFTI_SUFFIXES)}: {path}")
    array = np.asarray(array)
    if header is not None:
        header = header.copy()
        header.set_data_dtype(array.dtype)
        # A copied header may carry the source's scaling; the array holds final values, so let nibabel decide.
        header.set_slope_inter(None, None)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64), header=header)
    if header is None:
        img.header.set_data_dtype(array.dtype)
    # Hidden name with the real suffix, so nibabel compresses it the same way and folder listings skip it.
    with atomic_path(path, suffix=f".tmp{suffix}") as tmp:
        nib.save(img, tmp)
    return path


def affine_digest(affine: np.ndarray, shape: Sequence[int], decimals: int = 3) -> str:
    """Short stable digest of a volume's grid: its spatial shape and its affine rounded to ``10**-decimals`` mm.

    Sites send this instead of the affine, so the server can check that all modalities of a case lie on the same
    voxel grid without learning where the head is in scanner space.

    Args:
        affine: 4x4 voxel-to-world affine.
        shape: spatial shape ``(D, H, W)`` (extra axes are the caller's business: pass the spatial ones).
        decimals: rounding of the affine entries before hashing; ``3`` treats grids within ~1e-3 mm as equal.

    Returns:
        16 hex characters.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    # + 0.0 turns -0.0 into 0.0 so that tiny negative noise does not change the digest.
    rounded = np.round(affine, decimals) + 0.0
    payload = json.dumps(
        {"shape": [int(s) for s in shape], "affine": [f"{v:.{decimals}f}" for v in rounded.ravel()]},
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def geometry_header(header: nib.Nifti1Header) -> str:
    """A NIfTI header with its free-text fields blanked, as text: the grid of a case without its voxels.

    The inference job sends this for each new case so that the server can write the segmentation on the original
    grid (qform, sform, voxel sizes, units); no voxel value and no free text leaves the site.

    Returns:
        the 348-byte header, base64-encoded.
    """
    header = nib.Nifti1Header.from_header(header)
    for field in _FREE_TEXT_FIELDS:
        header[field] = b""
    return base64.b64encode(header.binaryblock).decode("ascii")


def header_from_geometry(text: str) -> nib.Nifti1Header:
    """Inverse of :func:`geometry_header`."""
    return nib.Nifti1Header(binaryblock=base64.b64decode(text.encode("ascii")))
