"""A site's modality folder and the server's label folder: listing, reading, normalising, describing, errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from splitunet.data.labels import labels_to_regions
from splitunet.data.nifti_io import affine_digest
from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError

SHAPE = (16, 18, 20)
CASES = ("BRATS_001", "BRATS_002", "BRATS_003")


def _affine(index: int) -> np.ndarray:
    affine = np.eye(4)
    if index:
        theta = np.deg2rad(12.0 * index)
        c, s = np.cos(theta), np.sin(theta)
        affine[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.diag([0.9, 1.0, 1.3])
        affine[:3, 3] = [5.0, -20.0 * index, 7.5]
    return affine


def _volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = np.zeros(SHAPE, np.float32)
    # A "brain" of nonzero voxels inside a zero background, as in skull-stripped BraTS scans.
    volume[3:13, 4:15, 5:16] = rng.normal(500.0, 80.0, size=(10, 11, 11))
    return volume


def _write_modality(folder, cases=CASES, suffix=".nii.gz"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases):
        nib.save(nib.Nifti1Image(_volume(i), _affine(i)), folder / f"{case}{suffix}")
    return folder


def _write_labels(folder, cases=CASES, values=(0, 1, 2, 3)):
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i, case in enumerate(cases):
        labels[case] = np.random.default_rng(10 + i).choice(values, size=SHAPE).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels[case], _affine(i)), folder / f"{case}.nii.gz")
    return labels


def test_modality_folder_lists_and_reads(tmp_path):
    folder = _write_modality(tmp_path / "flair")
    (tmp_path / "flair" / "notes.txt").write_text("ignored")
    (tmp_path / "flair" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")
    site = ModalityFolder(folder, "flair", party="site-1")
    assert site.case_ids == list(CASES)
    assert site.party == "site-1" and site.modality == "flair"

    volume, affine = site.read("BRATS_002")
    assert volume.shape == SHAPE and volume.dtype == np.float32
    np.testing.assert_allclose(affine, _affine(1), atol=1e-5)
    # z-score over the nonzero voxels; background stays 0.
    brain = _volume(1) != 0
    assert abs(volume[brain].mean()) < 1e-4 and abs(volume[brain].std() - 1.0) < 1e-3
    assert np.all(volume[~brain] == 0)
    # Cached and read-only, so sharing between calls is safe.
    assert site.read("BRATS_002")[0] is volume
    with pytest.raises(ValueError):
        volume[0, 0, 0] = 1.0


def test_describe_is_shape_and_digest(tmp_path):
    site = ModalityFolder(_write_modality(tmp_path / "t1"), "t1", party="site-2")
    labels_dir = tmp_path / "labels"
    _write_labels(labels_dir)
    server = LabelFolder(labels_dir, party="server")
    for i, case in enumerate(CASES):
        expected = {"shape": list(SHAPE), "affine_digest": affine_digest(_affine(i), SHAPE)}
        assert site.describe(case) == expected
        # The server checks alignment by comparing the two descriptions.
        assert server.describe(case) == expected
    assert json.loads(json.dumps(site.describe("BRATS_001"))) == site.describe("BRATS_001")


def test_uncompressed_files_and_lru_cache(tmp_path):
    site = ModalityFolder(_write_modality(tmp_path / "t2", suffix=".nii"), "t2", party="site-4", max_cached=1)
    first, _ = site.read("BRATS_001")
    site.read("BRATS_002")
    assert site.read("BRATS_001")[0] is not first  # evicted, read again
    np.testing.assert_array_equal(site.read("BRATS_001")[0], first)


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(SplitUNetDataError, match="not found") as info:
        ModalityFolder(tmp_path / "nowhere", "flair", party="site-1")
    assert "party=site-1" in str(info.value) and str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(SplitUNetDataError, match="no .nii") as info:
        ModalityFolder(tmp_path / "empty", "flair", party="site-1")
    assert info.value.party == "site-1" and info.value.file == str(tmp_path / "empty")
    with pytest.raises(SplitUNetDataError, match="no .nii"):
        LabelFolder(tmp_path / "empty", party="server")


def test_duplicate_case_ids(tmp_path):
    folder = _write_modality(tmp_path / "flair")
    nib.save(nib.Nifti1Image(_volume(0), np.eye(4)), folder / "BRATS_002.nii")
    with pytest.raises(SplitUNetDataError, match="two files") as info:
        ModalityFolder(folder, "flair", party="site-1")
    assert info.value.case == "BRATS_002" and "party=site-1" in str(info.value)


def test_unknown_case_and_modality(tmp_path):
    site = ModalityFolder(_write_modality(tmp_path / "flair"), "flair", party="site-1")
    with pytest.raises(SplitUNetDataError, match="no file") as info:
        site.read("BRATS_999")
    assert info.value.case == "BRATS_999" and info.value.party == "site-1"
    with pytest.raises(SplitUNetConfigError, match="unknown modality"):
        ModalityFolder(tmp_path / "flair", "dwi", party="site-1")


def test_bad_volume_errors_name_everything(tmp_path):
    folder = _write_modality(tmp_path / "t1gd")
    four_d = folder / "BRATS_002.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 4), np.float32), np.eye(4)), four_d)
    nan_file = folder / "BRATS_003.nii.gz"
    data = _volume(2)
    data[4, 5, 6] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan_file)
    site = ModalityFolder(folder, "t1gd", party="site-3")
    for case, path, match in (("BRATS_002", four_d, "4 dimensions"), ("BRATS_003", nan_file, "1 of")):
        with pytest.raises(SplitUNetDataError, match=match) as info:
            site.read(case)
        message = str(info.value)
        assert "party=site-3" in message and f"case={case}" in message and str(path) in message
    with pytest.raises(SplitUNetDataError, match="4 dimensions"):
        site.describe("BRATS_002")
    assert site.read("BRATS_001")[0].shape == SHAPE


def test_label_folder_reads_regions(tmp_path):
    labels = _write_labels(tmp_path / "labels")
    server = LabelFolder(tmp_path / "labels", "msd", party="server")
    assert server.case_ids == list(CASES)
    regions, affine = server.read("BRATS_003")
    assert regions.dtype == np.uint8 and regions.shape == (3, *SHAPE)
    np.testing.assert_array_equal(regions, labels_to_regions(labels["BRATS_003"], "msd"))
    np.testing.assert_allclose(affine, _affine(2), atol=1e-5)
    raw, _ = server.read_labels("BRATS_003")
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw, labels["BRATS_003"])


def test_label_folder_other_layout(tmp_path):
    labels = _write_labels(tmp_path / "seg", values=(0, 1, 2, 4))
    server = LabelFolder(tmp_path / "seg", "brats2021", party="server")
    regions, _ = server.read("BRATS_001")
    et = labels["BRATS_001"] == 4
    np.testing.assert_array_equal(regions[2], et.astype(np.uint8))
    # The same files are invalid under MSD numbering, and the error says where.
    with pytest.raises(SplitUNetDataError, match="label values 4") as info:
        LabelFolder(tmp_path / "seg", "msd", party="server").read("BRATS_001")
    message = str(info.value)
    assert "party=server" in message and "case=BRATS_001" in message
    assert str(tmp_path / "seg" / "BRATS_001.nii.gz") in message
    with pytest.raises(SplitUNetConfigError, match="known layouts"):
        LabelFolder(tmp_path / "seg", "brats2018")


def test_partition_layout_is_accepted(tmp_path):
    root = tmp_path / "out"
    _write_modality(root / "flair")
    _write_modality(root / "t2")
    _write_labels(root / "labels")
    for name, kind, modality in (("flair", "modality", "flair"), ("t2", "modality", "t2"), ("labels", "labels", None)):
        info = {"party_kind": kind, "modality": modality, "layout": "msd", "cases": list(CASES)}
        (root / name / "party.json").write_text(json.dumps(info))
    # The party folder itself, or the partition root.
    assert ModalityFolder(root / "flair", "flair", party="site-1").case_ids == list(CASES)
    site = ModalityFolder(root, "t2", party="site-4")
    assert site.folder == root / "t2" and site.case_ids == list(CASES)
    server = LabelFolder(root, party="server")
    assert server.folder == root / "labels" and server.case_ids == list(CASES)
    # party.json guards against a site pointed at another modality's folder, or labels in another layout.
    with pytest.raises(SplitUNetDataError, match="modality 't1'") as info:
        ModalityFolder(root / "flair", "t1", party="site-2")
    assert info.value.file == str(root / "flair" / "party.json")
    with pytest.raises(SplitUNetDataError, match="brats2023"):
        LabelFolder(root / "labels", "brats2023", party="server")
