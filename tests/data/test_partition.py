"""Partitioning a synthetic MSD Task01 dataset into one folder per modality and one for the labels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from splitunet.data.partition import partition_msd
from splitunet.errors import SplitUNetDataError
from splitunet.wire.protocol import LABELS_PARTY, MSD_CHANNEL_ORDER

SHAPE = (16, 18, 20)
CASES = ("BRATS_001", "BRATS_002", "BRATS_003")
MSD_MODALITY_NAMES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


def _affine(index: int) -> np.ndarray:
    # Case 0 axis-aligned; the others oblique with anisotropic voxels, as real scans can be.
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    if index:
        theta = np.deg2rad(7.0 * index)
        c, s = np.cos(theta), np.sin(theta)
        affine[:3, :3] = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.diag([1.1, 0.9, 1.5])
        affine[:3, 3] = [-80.0, 10.5 * index, 3.25]
    return affine


def _make_msd(root, cases=CASES, channels=4, modality=None):
    """Write an MSD Task01-like dataset; returns {case: (image (D,H,W,4), labels (D,H,W), affine)}."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    written, training = {}, []
    for index, case in enumerate(cases):
        # Channel c holds values around 100 * (c + 1), so a channel mix-up is visible.
        image = (rng.normal(size=(*SHAPE, channels)) + 100.0 * np.arange(1, channels + 1)).astype(np.float32)
        labels = rng.integers(0, 4, size=SHAPE).astype(np.uint8)
        affine = _affine(index)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        written[case] = (image, labels, affine)
    index = {"name": "BrainTumour", "modality": modality or MSD_MODALITY_NAMES, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(index))
    return written


def test_partition_happy_path(tmp_path):
    written = _make_msd(tmp_path / "src")
    out = tmp_path / "out"
    summary = partition_msd(tmp_path / "src", out, progress=False)
    assert summary["cases"] == list(CASES) and summary["layout"] == "msd"
    assert set(summary["parties"]) == {*MSD_CHANNEL_ORDER, LABELS_PARTY}

    for channel, modality in enumerate(MSD_CHANNEL_ORDER):
        info = json.loads((out / modality / "party.json").read_text())
        assert info == {"party_kind": "modality", "modality": modality, "layout": "msd", "cases": list(CASES)}
        for case, (image, _, affine) in written.items():
            img = nib.load(out / modality / f"{case}.nii.gz")
            assert img.shape == SHAPE and img.get_data_dtype() == np.float32
            np.testing.assert_allclose(img.affine, affine, atol=1e-5)
            np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), image[..., channel])

    info = json.loads((out / LABELS_PARTY / "party.json").read_text())
    assert info == {"party_kind": "labels", "modality": None, "layout": "msd", "cases": list(CASES)}
    for case, (_, labels, affine) in written.items():
        img = nib.load(out / LABELS_PARTY / f"{case}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    # No temporary files left behind.
    assert not [p for p in out.rglob(".*")]


def test_partition_is_rerunnable(tmp_path):
    _make_msd(tmp_path / "src")
    partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    assert len(list((tmp_path / "out" / "flair").glob("*.nii.gz"))) == len(CASES)


def test_partition_refuses_foreign_cases(tmp_path):
    _make_msd(tmp_path / "src")
    (tmp_path / "out" / "t2").mkdir(parents=True)
    stale = tmp_path / "out" / "t2" / "OLD_009.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), stale)
    with pytest.raises(SplitUNetDataError, match="not in this dataset") as info:
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    assert info.value.case == "OLD_009" and info.value.file == str(stale)


def _assert_names(info, case, path):
    message = str(info.value)
    assert f"case={case}" in message and str(path) in message and "party=" in message


def test_label_shape_mismatch(tmp_path):
    _make_msd(tmp_path / "src")
    path = tmp_path / "src" / "labelsTr" / "BRATS_002.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 18, 19), np.uint8), _affine(1)), path)
    with pytest.raises(SplitUNetDataError, match="label shape") as info:
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    _assert_names(info, "BRATS_002", path)
    # party.json is written last, so a failed partition is recognisable.
    assert not list((tmp_path / "out").rglob("party.json"))


def test_label_affine_mismatch(tmp_path):
    written = _make_msd(tmp_path / "src")
    path = tmp_path / "src" / "labelsTr" / "BRATS_003.nii.gz"
    affine = _affine(2).copy()
    affine[1, 3] += 0.5
    nib.save(nib.Nifti1Image(written["BRATS_003"][1], affine), path)
    with pytest.raises(SplitUNetDataError, match="affine") as info:
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    _assert_names(info, "BRATS_003", path)


def test_wrong_channel_count(tmp_path):
    _make_msd(tmp_path / "src", channels=3)
    with pytest.raises(SplitUNetDataError, match="3 channels") as info:
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    _assert_names(info, "BRATS_001", tmp_path / "src" / "imagesTr" / "BRATS_001.nii.gz")


def test_label_values_outside_layout(tmp_path):
    written = _make_msd(tmp_path / "src")
    labels = written["BRATS_002"][1].copy()
    labels[0, 0, 0] = 4  # BraTS 2021 ET value: wrong for MSD
    path = tmp_path / "src" / "labelsTr" / "BRATS_002.nii.gz"
    nib.save(nib.Nifti1Image(labels, _affine(1)), path)
    with pytest.raises(SplitUNetDataError, match="label values 4") as info:
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    _assert_names(info, "BRATS_002", path)


def test_missing_and_truncated_image(tmp_path):
    _make_msd(tmp_path / "src")
    path = tmp_path / "src" / "imagesTr" / "BRATS_002.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(SplitUNetDataError, match="cannot read") as info:
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    _assert_names(info, "BRATS_002", path)
    path.unlink()
    with pytest.raises(SplitUNetDataError, match="not found") as info:
        partition_msd(tmp_path / "src", tmp_path / "out2", progress=False)
    _assert_names(info, "BRATS_002", path)


def test_bad_dataset_json(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(SplitUNetDataError, match="dataset.json not found"):
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    (tmp_path / "src" / "dataset.json").write_text("{not json")
    with pytest.raises(SplitUNetDataError, match="cannot read dataset.json"):
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(SplitUNetDataError, match="no 'training'"):
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)


def test_channel_order_in_dataset_json_checked(tmp_path):
    _make_msd(tmp_path / "src", modality={"0": "T1w", "1": "FLAIR", "2": "t1gd", "3": "T2w"})
    with pytest.raises(SplitUNetDataError, match="channels"):
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)


def test_duplicate_training_entries(tmp_path):
    _make_msd(tmp_path / "src")
    index = json.loads((tmp_path / "src" / "dataset.json").read_text())
    index["training"].append(index["training"][0])
    (tmp_path / "src" / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(SplitUNetDataError, match="same case") as info:
        partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    assert info.value.case == "BRATS_001"


def test_partition_output_reads_as_party_folders(tmp_path):
    from splitunet.data.party_data import LabelFolder, ModalityFolder

    written = _make_msd(tmp_path / "src")
    partition_msd(tmp_path / "src", tmp_path / "out", progress=False)
    server = LabelFolder(tmp_path / "out", party="server")
    sites = [ModalityFolder(tmp_path / "out", m, party=f"site-{i}") for i, m in enumerate(MSD_CHANNEL_ORDER, 1)]
    for case in CASES:
        # Every party describes the same grid, so the server's alignment check passes.
        descriptions = {json.dumps(p.describe(case), sort_keys=True) for p in (server, *sites)}
        assert len(descriptions) == 1
        np.testing.assert_array_equal(server.read_labels(case)[0], written[case][1])
