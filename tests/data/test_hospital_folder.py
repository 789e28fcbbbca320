"""data.hospital_folder: a hospital's whole cases (every modality and the labels), read, normalised, checked."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.labels import labels_to_regions
from splitunet.data.party_data import ModalityFolder
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError

SHAPE = (16, 18, 20)
CASES = ("BRATS_001", "BRATS_002")
MSD_NAMES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = np.zeros((*SHAPE, 4), np.float32)
    # Nonzero "brain" voxels inside a zero background; each modality on its own scale, as scanners give them.
    image[3:13, 4:15, 5:16] = rng.normal([500.0, 900.0, 1200.0, 300.0], 60.0, size=(10, 11, 11, 4))
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:10, 6:12, 7:13] = rng.choice([1, 2, 3], size=(5, 6, 6))
    return image, labels


def _msd(root, cases=CASES):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    written = {}
    for index, case in enumerate(cases):
        image, labels = _case(index)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "labelsTr" / f"{case}.nii.gz")
        written[case] = (image, labels)
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
    (root / "dataset.json").write_text(json.dumps({"modality": MSD_NAMES, "training": training}))
    return written


def test_a_case_is_four_normalised_modalities_in_site_order_and_its_regions(tmp_path):
    written = _msd(tmp_path / "hospital")
    data = HospitalFolder(tmp_path / "hospital", party="hospital-a")
    assert data.case_ids == list(CASES)
    image, regions = data.read("BRATS_002")
    raw, labels = written["BRATS_002"]
    assert image.shape == (4, *SHAPE) and image.dtype == np.float32
    for channel in range(4):
        brain = raw[..., channel] != 0
        # z-scored over the brain, as each split site normalises its modality; the background stays 0.
        expected = (raw[..., channel] - raw[..., channel][brain].mean()) / raw[..., channel][brain].std()
        np.testing.assert_allclose(image[channel][brain], expected[brain], atol=1e-4)
        assert not image[channel][~brain].any()
    np.testing.assert_array_equal(regions, labels_to_regions(labels, "msd"))
    assert data.shape("BRATS_001") == SHAPE
    assert not image.flags.writeable and data.read("BRATS_002")[0] is image  # cached, shared read-only


def test_the_cache_keeps_the_most_recently_read_cases_and_shape_reads_no_voxels(tmp_path):
    _msd(tmp_path / "hospital")
    data = HospitalFolder(tmp_path / "hospital", party="hospital-a", max_cached=1)
    assert data.shape("BRATS_002") == SHAPE and not data._cache  # from the label's header
    first = data.read("BRATS_001")[0]
    data.read("BRATS_002")
    assert list(data._cache) == ["BRATS_002"] and data.read("BRATS_001")[0] is not first
    uncached = HospitalFolder(tmp_path / "hospital", party="hospital-a", max_cached=0)
    assert uncached.read("BRATS_001")[0] is not uncached.read("BRATS_001")[0] and not uncached._cache


def test_a_brats_folder_reads_the_same_way(tmp_path):
    image, labels = _case(0)
    folder = tmp_path / "brats" / "BraTS2021_00000"
    folder.mkdir(parents=True)
    for channel, suffix in enumerate(("flair", "t1", "t1ce", "t2")):
        nib.save(nib.Nifti1Image(image[..., channel], np.eye(4)), folder / f"BraTS2021_00000_{suffix}.nii.gz")
    brats_labels = np.select([labels == 1, labels == 2, labels == 3], [2, 1, 4], 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(brats_labels, np.eye(4)), folder / "BraTS2021_00000_seg.nii.gz")
    _msd(tmp_path / "msd", CASES[:1])
    brats = HospitalFolder(tmp_path / "brats", "brats2021", party="hospital-b")
    msd = HospitalFolder(tmp_path / "msd", party="hospital-a")
    for got, expected in zip(brats.read("BraTS2021_00000"), msd.read("BRATS_001")):
        np.testing.assert_array_equal(got, expected)


def _error(call) -> SplitUNetDataError:
    with pytest.raises(SplitUNetDataError) as caught:
        call()
    return caught.value


def test_a_missing_folder_or_index_names_the_hospital(tmp_path):
    error = _error(lambda: HospitalFolder(tmp_path / "nowhere", party="hospital-a"))
    assert error.party == "hospital-a" and error.file.endswith("nowhere")
    (tmp_path / "empty").mkdir()
    error = _error(lambda: HospitalFolder(tmp_path / "empty", party="hospital-a"))
    assert error.party == "hospital-a" and error.file.endswith("dataset.json") and "dataset.json" in str(error)


def test_a_missing_file_names_the_hospital_the_case_and_the_file(tmp_path):
    _msd(tmp_path / "hospital")
    (tmp_path / "hospital" / "labelsTr" / "BRATS_002.nii.gz").unlink()
    data = HospitalFolder(tmp_path / "hospital", party="hospital-a")
    error = _error(lambda: data.read("BRATS_002"))
    assert (error.party, error.case) == ("hospital-a", "BRATS_002")
    assert error.file.endswith("labelsTr/BRATS_002.nii.gz") and "not found" in error.message


def test_a_corrupt_image_names_the_hospital_the_case_and_the_file(tmp_path):
    _msd(tmp_path / "hospital")
    path = tmp_path / "hospital" / "imagesTr" / "BRATS_001.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    error = _error(lambda: HospitalFolder(tmp_path / "hospital", party="hospital-a").read("BRATS_001"))
    assert (error.party, error.case, error.file) == ("hospital-a", "BRATS_001", str(path))


def test_a_label_outside_the_layout_names_the_hospital_the_case_and_the_file(tmp_path):
    _msd(tmp_path / "hospital")
    path = tmp_path / "hospital" / "labelsTr" / "BRATS_001.nii.gz"
    labels = np.zeros(SHAPE, np.uint8)
    labels[0, 0, 0] = 4  # BraTS 2021's enhancing tumour: not a label of MSD's layout
    nib.save(nib.Nifti1Image(labels, np.eye(4)), path)
    error = _error(lambda: HospitalFolder(tmp_path / "hospital", party="hospital-a").read("BRATS_001"))
    assert (error.party, error.case, error.file) == ("hospital-a", "BRATS_001", str(path))
    assert "label values 4" in error.message


def test_an_image_on_another_grid_than_its_label_is_named(tmp_path):
    _msd(tmp_path / "hospital")
    path = tmp_path / "hospital" / "imagesTr" / "BRATS_002.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 18, 19, 4), np.float32), np.eye(4)), path)
    error = _error(lambda: HospitalFolder(tmp_path / "hospital", party="hospital-a").read("BRATS_002"))
    assert (error.party, error.case, error.file) == ("hospital-a", "BRATS_002", str(path))
    assert "differs from the label shape" in error.message


def test_an_unknown_case_or_layout_is_refused(tmp_path):
    _msd(tmp_path / "hospital")
    data = HospitalFolder(tmp_path / "hospital", party="hospital-a")
    assert _error(lambda: data.read("BRATS_099")).case == "BRATS_099"
    with pytest.raises(SplitUNetConfigError, match="hospital-a: unknown dataset layout 'nifti'"):
        HospitalFolder(tmp_path / "hospital", "nifti", party="hospital-a")


def test_a_phantom_hospital_reads_as_the_split_sites_read_its_modalities(tiny_parties):
    """The same phantom, partitioned for the split job and read whole by a hospital: the inputs are the same."""
    folder = HospitalFolder(tiny_parties.parent / "msd", party="a")
    case = folder.case_ids[0]
    image, regions = folder.read(case)
    assert image.shape == (4, 34, 36, 33) and image.dtype == np.float32
    assert regions.shape == (3, 34, 36, 33) and regions.dtype == np.uint8 and regions[1].any()
    for channel, modality in enumerate(("flair", "t1", "t1gd", "t2")):
        site_volume, _ = ModalityFolder(tiny_parties, modality, party="site").read(case)
        np.testing.assert_allclose(image[channel], site_volume, rtol=1e-5, atol=1e-5)
