"""End to end: ``splitunet predict`` segments new cases with a model trained in the simulator (jobs/split_unet_infer).

A tiny model is trained with mean fusion and modality dropout (``splitunet demo`` keeps every party's checkpoints
in ``<workspace>/checkpoints``). The new cases have an odd shape, an oblique affine with qform and sform, patient
text in the header, and no labels. Segmentations must lie on the input's grid, carry no header text, and follow
the requested label layout voxel for voxel; a model with mean fusion still predicts with a modality absent.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from tiny_job import tiny_server_args

from splitunet.data.labels import get_layout
from splitunet.tools.cli import main
from splitunet.tools.demo import DemoSettings, ensure_partitioned_phantom, run_demo
from splitunet.wire.protocol import MODALITIES

pytestmark = pytest.mark.e2e

SHAPE = (33, 35, 37)
OBLIQUE = np.array([[0.95, 0.12, 0.0, -81.5], [-0.1, 1.05, 0.08, 22.0], [0.02, -0.06, 1.2, 7.25], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("trained")
    # Long enough that the model predicts tumour on the new cases (oedema and core with this secret, measured; with
    # the per-region binary cross-entropy 24 iterations gave core only).
    server_args = tiny_server_args(
        num_iterations=40,
        val_every=40,
        num_val_cases=1,
        learning_rate=0.01,
        fusion="mean",
        modality_dropout=0.25,
        sw_batch_size=2,
    )
    # A fixed case-key secret: it decides the train/validation split and the crop order, so the training is the
    # same every time (a random one made this model predict some classes in one run and not in another).
    (workspace / "data").mkdir()
    (workspace / "data" / "case_key_secret.txt").write_text("predict-test-secret")
    # Fixed encoder seeds too (private ones are drawn at random otherwise): those the job's seed 0 gives a site
    # without its own (seed + 1 + modality index), with which the model above was measured.
    seeds = {f"site-{index}": index for index in range(1, len(MODALITIES) + 1)}
    settings = DemoSettings(
        cases=4, shape=(32, 32, 32), seed=4, server_args=server_args, timeout_s=600, encoder_seeds=seeds
    )
    run_demo(workspace, settings)
    return workspace / "checkpoints"


@pytest.fixture(scope="module")
def new_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("new")
    parties = ensure_partitioned_phantom(root, cases=2, shape=SHAPE, seed=77)
    shutil.rmtree(parties / "labels")  # new patients: nobody has labels
    for modality in MODALITIES:
        for path in sorted((parties / modality).glob("*.nii.gz")):
            image = nib.load(path)
            moved = nib.Nifti1Image(np.asarray(image.dataobj), OBLIQUE)
            moved.header.set_qform(OBLIQUE, code=1)
            moved.header.set_sform(OBLIQUE, code=2)
            moved.header["descrip"] = b"Doe^John 1970-01-01"
            nib.save(moved, path)
    return parties


def _predict(tmp_path_factory, checkpoints, new_cases, *options):
    out = tmp_path_factory.mktemp("predicted")
    command = ["predict", "--data", str(new_cases), "--checkpoints", str(checkpoints), "--out", str(out)]
    assert main([*command, "--checkpoint", "last", *options]) == 0
    return out, json.loads((out / "predictions.json").read_text())


@pytest.fixture(scope="module")
def msd(tmp_path_factory, checkpoints, new_cases):
    return _predict(tmp_path_factory, checkpoints, new_cases, "--layout", "msd")


@pytest.fixture(scope="module")
def brats(tmp_path_factory, checkpoints, new_cases):
    return _predict(tmp_path_factory, checkpoints, new_cases, "--layout", "brats2021")


def test_one_segmentation_per_case_on_the_input_grid(msd, new_cases):
    out, summary = msd
    cases = sorted(path.name.removesuffix(".nii.gz") for path in (new_cases / "flair").glob("*.nii.gz"))
    assert sorted(summary["predictions"]) == cases
    for case in cases:
        segmentation = nib.load(out / f"{case}.nii.gz")
        source = nib.load(new_cases / "t1" / f"{case}.nii.gz")
        assert segmentation.shape == SHAPE
        np.testing.assert_allclose(segmentation.affine, source.affine, atol=1e-6)
        assert int(segmentation.header["qform_code"]) == 1 and int(segmentation.header["sform_code"]) == 2
        assert segmentation.header["descrip"].tobytes().strip(b"\0") == b""
        assert segmentation.get_data_dtype() == np.uint8
    assert summary["absent_modalities"] == [] and summary["layout"] == "msd"


def test_labels_follow_the_requested_layout_voxel_for_voxel(msd, brats):
    (msd_dir, msd_summary), (brats_dir, _) = msd, brats
    msd_layout, brats_layout = get_layout("msd"), get_layout("brats2021")
    predicted = set()
    for case in msd_summary["predictions"]:
        a = np.asarray(nib.load(msd_dir / f"{case}.nii.gz").dataobj)
        b = np.asarray(nib.load(brats_dir / f"{case}.nii.gz").dataobj)
        assert set(np.unique(a).tolist()) <= set(msd_layout.allowed_values)
        assert set(np.unique(b).tolist()) <= set(brats_layout.allowed_values)
        # The same model and cases: each MSD class must map to its BraTS 2021 value.
        for label in ("oedema_label", "core_label", "enhancing_label"):
            np.testing.assert_array_equal(a == getattr(msd_layout, label), b == getattr(brats_layout, label))
        predicted.update(np.unique(a).tolist())
    # MSD and BraTS 2021 swap the oedema and core values (1 <-> 2): two tumour classes make the check bite.
    assert len(predicted - {0}) >= 2, f"the comparison needs tumour classes predicted, got {sorted(predicted)}"


def test_mean_fusion_model_predicts_without_a_modality(tmp_path_factory, checkpoints, new_cases, msd):
    out, summary = _predict(tmp_path_factory, checkpoints, new_cases, "--without", "t1gd")
    assert summary["absent_modalities"] == ["t1gd"]
    assert sorted(summary["predictions"]) == sorted(msd[1]["predictions"])
    for case in summary["predictions"]:
        assert nib.load(out / f"{case}.nii.gz").shape == SHAPE
