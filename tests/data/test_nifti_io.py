"""NIfTI loading with named errors, atomic saving, and the affine digest sites send instead of affines."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from splitunet.data.nifti_io import (
    affine_digest,
    geometry_header,
    header_from_geometry,
    load_nifti,
    nifti_case_id,
    read_volume,
    save_nifti_atomic,
)
from splitunet.errors import SplitUNetDataError

SHAPE = (16, 18, 20)


def _oblique_affine() -> np.ndarray:
    # 10 degrees about z, anisotropic 1.2 x 1.0 x 2.5 mm voxels, an offset: valid but not axis-aligned.
    theta = np.deg2rad(10.0)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.2, 1.0, 2.5])
    affine[:3, 3] = [-90.5, 12.25, 30.0]
    return affine


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def _volume(seed=0):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def _assert_names(info, path, case="BRATS_003", party="site-2"):
    message = str(info.value)
    assert f"party={party}" in message and f"case={case}" in message and str(path) in message
    assert info.value.file == str(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_read_volume_happy_path(tmp_path, suffix):
    affine = _oblique_affine()
    data = _volume()
    path = _write(tmp_path / f"BRATS_003{suffix}", data, affine)
    volume, read_affine, header = read_volume(path, party="site-2", case="BRATS_003")
    assert volume.dtype == np.float32 and volume.shape == SHAPE
    np.testing.assert_allclose(volume, data)
    np.testing.assert_allclose(read_affine, affine, atol=1e-5)
    assert read_affine.shape == (4, 4) and read_affine.dtype == np.float64
    assert tuple(header.get_data_shape()) == SHAPE


def test_trailing_singleton_axes_count_as_3d(tmp_path):
    path = _write(tmp_path / "c.nii.gz", _volume()[..., None])
    volume, _, _ = read_volume(path, party="site-1", case="c")
    assert volume.shape == SHAPE


def test_missing_file(tmp_path):
    path = tmp_path / "BRATS_003.nii.gz"
    with pytest.raises(SplitUNetDataError, match="not found") as info:
        read_volume(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "BRATS_003.nii.gz"
    path.touch()
    with pytest.raises(SplitUNetDataError, match="empty") as info:
        load_nifti(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


def test_not_gzip(tmp_path):
    path = tmp_path / "BRATS_003.nii.gz"
    path.write_bytes(b"this is not a gzip stream" * 40)
    with pytest.raises(SplitUNetDataError, match="cannot read") as info:
        read_volume(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


def test_garbage_nifti(tmp_path):
    path = tmp_path / "BRATS_003.nii"
    path.write_bytes(os.urandom(600))
    with pytest.raises(SplitUNetDataError, match="cannot read") as info:
        read_volume(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_file(tmp_path, suffix):
    path = _write(tmp_path / f"BRATS_003{suffix}", _volume())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SplitUNetDataError, match="cannot read") as info:
        read_volume(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


def test_corrupt_gzip_payload(tmp_path):
    # Intact gzip header, NIfTI header readable, but the deflate stream is damaged after the NIfTI header.
    path = tmp_path / "BRATS_003.nii.gz"
    raw = bytearray(gzip.compress(nib.Nifti1Image(_volume(), np.eye(4)).to_bytes()))
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SplitUNetDataError, match="cannot read") as info:
        read_volume(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


def test_wrong_ndim(tmp_path):
    path = _write(tmp_path / "BRATS_003.nii.gz", np.zeros((*SHAPE, 4), np.float32))
    with pytest.raises(SplitUNetDataError, match="4 dimensions.*expected 3") as info:
        read_volume(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)
    with pytest.raises(SplitUNetDataError, match="3 dimensions.*expected 4"):
        read_volume(_write(tmp_path / "x.nii.gz", _volume()), party="site-2", case="x", ndim=(4,))


def test_wrong_channel_count(tmp_path):
    path = _write(tmp_path / "BRATS_003.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    with pytest.raises(SplitUNetDataError, match="3 channels.*expected 4") as info:
        load_nifti(path, party="site-2", case="BRATS_003", ndim=(4,), channels=4)
    _assert_names(info, path)
    data, _, _ = read_volume(path, party="site-2", case="BRATS_003", ndim=(4,), channels=3)
    assert data.shape == (*SHAPE, 3)


def test_nan_and_inf_voxels(tmp_path):
    data = _volume()
    data[0, 0, :5] = np.nan
    data[1, 1, 1] = np.inf
    path = _write(tmp_path / "BRATS_003.nii.gz", data)
    with pytest.raises(SplitUNetDataError, match=r"6 of \d+ voxels are not finite") as info:
        read_volume(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


def _write_with_sform(path, srow_x):
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = srow_x, [0, 1, 0, 0], [0, 0, 1, 0]
    header["sform_code"], header["qform_code"] = 1, 0
    # affine=None keeps the header's sform as written instead of recomputing it.
    nib.save(nib.Nifti1Image(_volume(), None, header=header), path)
    return path


def test_non_finite_affine(tmp_path):
    path = _write_with_sform(tmp_path / "BRATS_003.nii.gz", [np.nan, 0, 0, 0])
    with pytest.raises(SplitUNetDataError, match="not finite") as info:
        load_nifti(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


def test_singular_affine(tmp_path):
    path = _write_with_sform(tmp_path / "BRATS_003.nii.gz", [0, 0, 0, 0])
    with pytest.raises(SplitUNetDataError, match="singular") as info:
        load_nifti(path, party="site-2", case="BRATS_003")
    _assert_names(info, path)


def test_not_a_nifti_file_name_or_type(tmp_path):
    folder = tmp_path / "BRATS_003.nii.gz"
    folder.mkdir()
    with pytest.raises(SplitUNetDataError, match="not a regular file"):
        load_nifti(folder, party="site-2", case="BRATS_003")
    assert nifti_case_id("a/BRATS_001.nii.gz") == "BRATS_001"
    assert nifti_case_id("BRATS_001.nii") == "BRATS_001"
    assert nifti_case_id("dataset.json") is None and nifti_case_id(".nii.gz") is None


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_save_nifti_atomic_round_trip(tmp_path, suffix):
    affine = _oblique_affine()
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 7
    path = save_nifti_atomic(data, affine, tmp_path / "sub" / f"case{suffix}")
    assert path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    if suffix == ".nii.gz":
        assert path.read_bytes()[:2] == b"\x1f\x8b"


def test_save_nifti_atomic_header_from_4d_source(tmp_path):
    # A header copied from a scaled 4D int16 image must not rescale or reshape the 3D float output.
    source = nib.Nifti1Image(np.zeros((*SHAPE, 4), np.int16), _oblique_affine())
    source.header.set_slope_inter(2.0, 1.0)
    source.header.set_xyzt_units("mm", "sec")
    data = _volume()
    path = save_nifti_atomic(data, source.affine, tmp_path / "c.nii.gz", header=source.header)
    img = nib.load(path)
    assert img.shape == SHAPE and img.get_data_dtype() == np.float32
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(img.get_fdata(), data, rtol=1e-6)


def test_save_nifti_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "case.nii.gz"
    save_nifti_atomic(_volume(0), np.eye(4), target)
    before = target.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_nifti_atomic(_volume(1), np.eye(4), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_save_nifti_atomic_rejects_other_suffix(tmp_path):
    with pytest.raises(ValueError, match="nii"):
        save_nifti_atomic(_volume(), np.eye(4), tmp_path / "case.mgz")


def test_affine_digest():
    affine = _oblique_affine()
    digest = affine_digest(affine, SHAPE)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert affine_digest(affine, list(SHAPE)) == digest
    # Float noise far below the rounding step (and -0.0 vs 0.0) does not change it.
    noisy = affine + 1e-7
    noisy[0, 2] = -1e-9
    assert affine_digest(noisy, SHAPE) == digest
    moved = affine.copy()
    moved[0, 3] += 0.01
    assert affine_digest(moved, SHAPE) != digest
    assert affine_digest(affine, (16, 18, 21)) != digest
    assert affine_digest(np.eye(4), SHAPE) != digest
    with pytest.raises(ValueError):
        affine_digest(np.eye(3), SHAPE)


def test_geometry_header_keeps_the_grid_and_drops_free_text(tmp_path):
    affine = np.array([[0.9, 0.2, 0.0, -80.0], [-0.15, 1.1, 0.1, 20.0], [0.0, -0.05, 1.2, 7.0], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    image.header["descrip"] = b"Doe^John 1970"
    image.header["aux_file"] = b"scan 12"
    text = geometry_header(image.header)
    assert isinstance(text, str) and "Doe" not in text
    header = header_from_geometry(text)
    assert header["descrip"].tobytes().strip(b"\0") == b"" and header["aux_file"].tobytes().strip(b"\0") == b""
    path = save_nifti_atomic(np.ones((5, 6, 7), np.uint8), header.get_best_affine(), tmp_path / "s.nii.gz", header)
    written = nib.load(path)
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    assert written.header.get_zooms() == pytest.approx(image.header.get_zooms())
