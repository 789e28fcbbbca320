"""What the end-to-end tests look for in what FLARE keeps at the server: case IDs, data paths, the case-key secret.

Every file is read as bytes; gzip files are read unpacked too, and zip archives (FLARE's job store, torch
checkpoints) member by member, nested ones included.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from splitunet.data.nifti_io import nifti_case_id

__all__ = ["private_strings", "find_private", "corrupt_voxels"]


def private_strings(settings_file: Path, partition: Path) -> dict[str, str]:
    """What must not appear: every case ID of the partition, every party's data folder, the case-key secret.

    Returns:
        what to search for -> why it is private.
    """
    settings = json.loads(settings_file.read_text())
    found = {settings["case_key_secret"]: "the case-key secret"}
    for party, entry in settings["parties"].items():
        for name in ("data_dir", "labels_dir", "inference_dir"):
            if entry.get(name):
                found[entry[name]] = f"{party}'s {name}"
    for path in partition.glob("*/*"):
        case = nifti_case_id(path)
        if case:
            found[case] = f"case ID ({path.parent.name})"
    return found


def _contents(name: str, data: bytes, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    yield name, data
    if depth > 3:
        return
    if data[:2] == b"\x1f\x8b":
        try:
            yield from _contents(f"{name} (gunzipped)", gzip.decompress(data), depth + 1)
        except (OSError, EOFError):
            pass
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    yield from _contents(f"{name}:{member}", archive.read(member), depth + 1)
        except zipfile.BadZipFile:
            pass


def find_private(root: Path, strings: Mapping[str, str], skip: tuple[str, ...] = ()) -> list[str]:
    """``"<file>: <why>"`` for each private string found in a file under ``root`` (empty: none found).

    Args:
        root: the folder to search, recursively.
        strings: what to look for -> why it is private (:func:`private_strings`).
        skip: names of ``root``'s sub-folders to leave out (a party's own ``local/`` settings).
    """
    needles = {text.encode("utf-8"): why for text, why in strings.items()}
    found = []
    files = [
        path
        for path in sorted(Path(root).rglob("*"))
        if path.is_file() and not path.is_symlink() and path.relative_to(root).parts[0] not in skip
    ]
    assert files, f"nothing to search under {root}"
    for path in files:
        for name, data in _contents(str(path.relative_to(root)), path.read_bytes()):
            # File and folder names count too: a preview named by case ID is a leak.
            haystack = data + b"\n" + name.encode("utf-8")
            found += [f"{name}: {why} {needle!r}" for needle, why in needles.items() if needle in haystack]
    return found


def corrupt_voxels(path: Path) -> None:
    """Make one voxel of a NIfTI volume NaN; its header stays valid, so the case passes setup and fails when read."""
    import nibabel as nib
    import numpy as np

    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
