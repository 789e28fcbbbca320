"""Partitioning tiny synthetic MSD, BraTS 2021 and BraTS 2023 datasets, read back as the parties read them.

Volumes are 7 x 9 x 11 (odd, non-cubic) on oblique grids, one with a shear, so an axis swap, a transposed affine
or a lost sform shows. Every modality has its own intensity range, so a modality mix-up shows too.
"""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import NormalizeIntensity

from splitunet.data import party_data
from splitunet.data.labels import LAYOUTS, labels_to_regions
from splitunet.data.layouts import BRATS_FILE_NAMES, find_source_cases
from splitunet.data.partition import PARTY_FILE, partition, read_partition_layout
from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.errors import SplitUNetDataError
from splitunet.tools.cli import main
from splitunet.wire.protocol import LABELS_PARTY, MODALITIES, MSD_CHANNEL_ORDER

SHAPE = (7, 9, 11)
LAYOUT_NAMES = ("msd", "brats2021", "brats2023")
BRATS = tuple(BRATS_FILE_NAMES)
CASE_IDS = {
    "msd": ("BRATS_001", "BRATS_002"),
    "brats2021": ("BraTS2021_00000", "BraTS2021_00002"),
    "brats2023": ("BraTS-GLI-00000-000", "BraTS-GLI-00002-001"),
}
# A value each layout does not define (the enhancing-tumour label of another release).
FOREIGN_LABEL = {"msd": 4, "brats2021": 3, "brats2023": 4}


def _affine(index: int) -> np.ndarray:
    """Oblique, anisotropic voxel-to-world affine; case 1 also sheared (only an sform can hold that)."""
    ax, az = np.deg2rad(20.0 + 5 * index), np.deg2rad(35.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rot_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    shear = np.array([[1, 0.15 * index, 0], [0, 1, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot_z @ rot_x @ shear @ np.diag([0.9, 1.2, 2.5])
    affine[:3, 3] = [-90.5, 12.25 + index, -40.0]
    return affine


def _brats_path(root, layout, case, suffix):
    return root / case / BRATS_FILE_NAMES[layout].file_name(case, suffix)


def _source_path(root, layout, case, role):
    """Source file of a case's modality or labels (MSD: the 4D image for any modality)."""
    if layout == "msd":
        return root / ("labelsTr" if role == LABELS_PARTY else "imagesTr") / f"{case}.nii.gz"
    names = BRATS_FILE_NAMES[layout]
    return _brats_path(
        root, layout, case, names.label_suffix if role == LABELS_PARTY else names.modality_suffixes[role]
    )


def write_dataset(root, layout):
    """Write a 2-case dataset in ``layout``; returns ``{case: (images {modality: (D,H,W)}, labels, affine)}``."""
    rng = np.random.default_rng(LAYOUT_NAMES.index(layout))
    written, training = {}, []
    for index, case in enumerate(CASE_IDS[layout]):
        affine = _affine(index)
        # Background zeros (as skull-stripped scans) and a modality-specific range, so normalisation and mix-ups show.
        images = {
            m: np.where(rng.random(SHAPE) < 0.2, 0, rng.integers(1, 50, SHAPE) + 100 * (c + 1)).astype(np.int16)
            for c, m in enumerate(MODALITIES)
        }
        labels = rng.choice(LAYOUTS[layout].allowed_values, size=SHAPE).astype(np.uint8)
        written[case] = (images, labels, affine)
        label_path = _source_path(root, layout, case, LABELS_PARTY)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        # BraTS 2023 ships float labels; they must come out as uint8 in the same numbering.
        label_dtype = np.float32 if layout == "brats2023" else np.uint8
        nib.save(nib.Nifti1Image(labels.astype(label_dtype), affine), label_path)
        if layout == "msd":
            stacked = np.stack([images[m] for m in MSD_CHANNEL_ORDER], axis=-1).astype(np.float32)
            (root / "imagesTr").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(stacked, affine), _source_path(root, layout, case, "flair"))
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        else:
            for modality, volume in images.items():
                nib.save(nib.Nifti1Image(volume, affine), _source_path(root, layout, case, modality))
    if layout == "msd":
        modality = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
        (root / "dataset.json").write_text(json.dumps({"modality": modality, "training": training}))
    return written


def _leftovers(out):
    # Temporary files of atomic writes are hidden; none may survive.
    return [p for p in out.rglob(".*")]


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_round_trip_through_party_folders(tmp_path, layout):
    src, out = tmp_path / "src", tmp_path / "out"
    written = write_dataset(src, layout)
    # A macOS resource fork beside the real files is not a case (and not valid NIfTI).
    (src / "._junk_flair.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    summary = partition(src, out, layout, progress=False)
    assert summary["layout"] == layout and summary["cases"] == list(CASE_IDS[layout])
    assert read_partition_layout(out) == layout == read_partition_layout(out / LABELS_PARTY)

    sites = {m: ModalityFolder(out, m, party=f"site-{i}") for i, m in enumerate(MODALITIES, 1)}
    server = LabelFolder(out, layout, party="server")
    normalize = NormalizeIntensity(nonzero=True)
    for case, (images, labels, affine) in written.items():
        for modality, site in sites.items():
            raw = nib.load(out / modality / f"{case}.nii.gz")
            assert raw.shape == SHAPE
            np.testing.assert_allclose(raw.affine, affine, atol=1e-5)
            np.testing.assert_array_equal(np.asanyarray(raw.dataobj), images[modality])
            volume, site_affine = site.read(case)
            np.testing.assert_allclose(site_affine, affine, atol=1e-5)
            expected = np.asarray(normalize(images[modality].astype(np.float32)))
            np.testing.assert_allclose(volume, expected, rtol=1e-5, atol=1e-5)
        label_values, label_affine = server.read_labels(case)
        assert label_values.dtype == np.uint8
        np.testing.assert_array_equal(label_values, labels)
        np.testing.assert_allclose(label_affine, affine, atol=1e-5)
        np.testing.assert_array_equal(server.read(case)[0], labels_to_regions(labels, layout))
        # Every party describes the same grid, so the server's alignment check passes.
        assert len({json.dumps(p.describe(case), sort_keys=True) for p in (server, *sites.values())}) == 1
    assert not _leftovers(out)


def test_brats_source_dtype_kept_and_msd_channels_split(tmp_path):
    write_dataset(tmp_path / "b", "brats2021")
    partition(tmp_path / "b", tmp_path / "bo", "brats2021", progress=False)
    assert nib.load(tmp_path / "bo" / "t1gd" / f"{CASE_IDS['brats2021'][0]}.nii.gz").get_data_dtype() == np.int16
    write_dataset(tmp_path / "m", "msd")
    partition(tmp_path / "m", tmp_path / "mo", "msd", progress=False)
    assert nib.load(tmp_path / "mo" / "t2" / "BRATS_001.nii.gz").get_data_dtype() == np.float32


def test_labels_keep_their_layout_and_the_server_checks_it(tmp_path):
    write_dataset(tmp_path / "src", "brats2021")
    partition(tmp_path / "src", tmp_path / "out", "brats2021", progress=False)
    info = json.loads((tmp_path / "out" / LABELS_PARTY / PARTY_FILE).read_text())
    assert info == {
        "party_kind": "labels",
        "modality": None,
        "layout": "brats2021",
        "cases": list(CASE_IDS["brats2021"]),
    }
    # A server set up for another numbering refuses the folder instead of mis-reading label 4.
    with pytest.raises(SplitUNetDataError, match="layout 'brats2021'"):
        LabelFolder(tmp_path / "out", "msd", party="server")


def test_party_file_name_matches_the_reader():
    assert PARTY_FILE == party_data.PARTY_FILE


def test_brats_flat_folder_and_output_inside_source(tmp_path):
    src = tmp_path / "src"
    written = write_dataset(src, "brats2023")
    for case in written:
        for path in (src / case).iterdir():
            path.rename(src / path.name)
        (src / case).rmdir()
    # The output folder inside the source is not read back as source cases on a second run.
    for _ in range(2):
        summary = partition(src, src / "parties", "brats2023", progress=False)
    assert summary["cases"] == list(CASE_IDS["brats2023"])


def _assert_names(info, party, case, path):
    error = info.value
    assert (error.party, error.case, error.file) == (party, case, str(path)), str(error)
    assert f"party={party}" in str(error) and f"case={case}" in str(error) and str(path) in str(error)


def _partition_fails(tmp_path, layout, match):
    with pytest.raises(SplitUNetDataError, match=match) as info:
        partition(tmp_path / "src", tmp_path / "out", layout, progress=False)
    out = tmp_path / "out"
    if out.exists():
        assert not list(out.rglob(PARTY_FILE)) and not _leftovers(out)
    return info


@pytest.mark.parametrize("layout", BRATS)
@pytest.mark.parametrize("role", ["t1gd", LABELS_PARTY])
def test_missing_file(tmp_path, layout, role):
    write_dataset(tmp_path / "src", layout)
    case = CASE_IDS[layout][1]
    path = _source_path(tmp_path / "src", layout, case, role)
    path.unlink()
    info = _partition_fails(tmp_path, layout, f"{role} file missing")
    _assert_names(info, role, case, path)


@pytest.mark.parametrize("layout", BRATS)
def test_duplicate_case_id(tmp_path, layout):
    write_dataset(tmp_path / "src", layout)
    case = CASE_IDS[layout][0]
    shutil.copytree(tmp_path / "src" / case, tmp_path / "src" / "copy" / case)
    info = _partition_fails(tmp_path, layout, "duplicate case ID")
    assert info.value.case == case and "copy" in str(info.value)


def test_case_split_over_folders(tmp_path):
    write_dataset(tmp_path / "src", "brats2023")
    case = CASE_IDS["brats2023"][0]
    t1c = _source_path(tmp_path / "src", "brats2023", case, "t1gd")
    (tmp_path / "src" / "extra").mkdir()
    t1c.rename(tmp_path / "src" / "extra" / t1c.name)
    info = _partition_fails(tmp_path, "brats2023", "several folders")
    assert info.value.case == case and str(tmp_path / "src" / "extra") in str(info.value)


def test_same_modality_as_nii_and_nii_gz(tmp_path):
    write_dataset(tmp_path / "src", "brats2021")
    case = CASE_IDS["brats2021"][0]
    gz = _source_path(tmp_path / "src", "brats2021", case, "t2")
    gz.with_name(gz.name[: -len(".gz")]).write_bytes(gzip.decompress(gz.read_bytes()))
    info = _partition_fails(tmp_path, "brats2021", "two files hold the t2")
    assert info.value.case == case


@pytest.mark.parametrize("layout", BRATS)
def test_empty_dataset(tmp_path, layout):
    (tmp_path / "src" / "notes").mkdir(parents=True)
    info = _partition_fails(tmp_path, layout, f"no {layout} cases found")
    assert info.value.file == str(tmp_path / "src")


@pytest.mark.parametrize(
    "written, asked", [("brats2021", "brats2023"), ("brats2023", "brats2021"), ("msd", "brats2021")]
)
def test_wrong_layout_names_the_likely_one(tmp_path, written, asked):
    write_dataset(tmp_path / "src", written)
    _partition_fails(tmp_path, asked, f"--layout {written}")


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unreadable_file(tmp_path, layout, damage):
    write_dataset(tmp_path / "src", layout)
    case = CASE_IDS[layout][1]
    path = _source_path(tmp_path / "src", layout, case, "t1")
    raw = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else raw[: len(raw) * 2 // 3])
    info = _partition_fails(tmp_path, layout, "0 bytes" if damage == "empty" else "cannot read")
    _assert_names(info, "partition" if layout == "msd" else "t1", case, path)
    # The bad case is checked before any of its files is written; the good case before it was written.
    assert not list((tmp_path / "out").rglob(f"{case}.nii*"))
    assert (tmp_path / "out" / "t1" / f"{CASE_IDS[layout][0]}.nii.gz").is_file()


@pytest.mark.parametrize("layout", BRATS)
def test_modality_shape_mismatch(tmp_path, layout):
    written = write_dataset(tmp_path / "src", layout)
    case = CASE_IDS[layout][0]
    path = _source_path(tmp_path / "src", layout, case, "t2")
    nib.save(nib.Nifti1Image(written[case][0]["t2"][:, :, :-1], written[case][2]), path)
    info = _partition_fails(tmp_path, layout, r"t2 image shape \[7, 9, 10\] differs from the flair image shape")
    _assert_names(info, "t2", case, path)
    assert str(_source_path(tmp_path / "src", layout, case, "flair")) in str(info.value)


@pytest.mark.parametrize("layout", BRATS)
@pytest.mark.parametrize("role", ["t1", LABELS_PARTY])
def test_affine_mismatch(tmp_path, layout, role):
    written = write_dataset(tmp_path / "src", layout)
    case = CASE_IDS[layout][1]
    path = _source_path(tmp_path / "src", layout, case, role)
    affine = written[case][2].copy()
    affine[2, 3] += 0.5
    volume = written[case][1] if role == LABELS_PARTY else written[case][0][role]
    nib.save(nib.Nifti1Image(volume, affine), path)
    info = _partition_fails(tmp_path, layout, f"{'label' if role == LABELS_PARTY else 't1 image'} affine differs")
    _assert_names(info, role, case, path)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_label_value_outside_layout(tmp_path, layout):
    written = write_dataset(tmp_path / "src", layout)
    case = CASE_IDS[layout][1]
    path = _source_path(tmp_path / "src", layout, case, LABELS_PARTY)
    labels = written[case][1].copy()
    labels[3, 4, 5] = FOREIGN_LABEL[layout]
    nib.save(nib.Nifti1Image(labels, written[case][2]), path)
    info = _partition_fails(tmp_path, layout, f"label values {FOREIGN_LABEL[layout]} are not in layout '{layout}'")
    _assert_names(info, LABELS_PARTY, case, path)


@pytest.mark.parametrize("layout", BRATS)
def test_nan_voxels_and_4d_modality(tmp_path, layout):
    written = write_dataset(tmp_path / "src", layout)
    case = CASE_IDS[layout][0]
    images, _, affine = written[case]
    path = _source_path(tmp_path / "src", layout, case, "flair")
    volume = images["flair"].astype(np.float32)
    volume[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(volume, affine), path)
    _assert_names(_partition_fails(tmp_path, layout, "not finite"), "flair", case, path)
    nib.save(nib.Nifti1Image(np.stack([images["flair"]] * 2, axis=-1), affine), path)
    _assert_names(_partition_fails(tmp_path, layout, "4 dimensions"), "flair", case, path)


def test_failed_rerun_leaves_no_party_file(tmp_path):
    written = write_dataset(tmp_path / "src", "brats2023")
    partition(tmp_path / "src", tmp_path / "out", "brats2023", progress=False)
    case = CASE_IDS["brats2023"][1]
    labels = written[case][1].copy()
    labels[0, 0, 0] = 4
    nib.save(nib.Nifti1Image(labels, written[case][2]), _source_path(tmp_path / "src", "brats2023", case, "labels"))
    # The old party.json files would vouch for a folder that now mixes two runs.
    _partition_fails(tmp_path, "brats2023", "label values 4")
    with pytest.raises(SplitUNetDataError, match="did not finish"):
        read_partition_layout(tmp_path / "out")


def test_find_source_cases_maps_modalities_explicitly(tmp_path):
    write_dataset(tmp_path / "src", "brats2023")
    (case, *_) = find_source_cases(tmp_path / "src", "brats2023")
    assert {m: image.path.name for m, image in case.images.items()} == {
        "flair": "BraTS-GLI-00000-000-t2f.nii.gz",
        "t1": "BraTS-GLI-00000-000-t1n.nii.gz",
        "t1gd": "BraTS-GLI-00000-000-t1c.nii.gz",
        "t2": "BraTS-GLI-00000-000-t2w.nii.gz",
    }
    assert case.label.name == "BraTS-GLI-00000-000-seg.nii.gz"
    with pytest.raises(ValueError, match="unknown dataset layout"):
        partition(tmp_path / "src", tmp_path / "out", "brats2018", progress=False)


def test_cli_layout(tmp_path, capsys):
    write_dataset(tmp_path / "src", "brats2021")
    args = ["partition", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*args, "--layout", "brats2021"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "brats2021"
    # The default is MSD: the BraTS folder has no dataset.json, and the error says which layout it looks like.
    assert main([*args[:-2], str(tmp_path / "out2"), "--quiet"]) == 2
    assert "--layout brats2021" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--layout", "brats2018"])
