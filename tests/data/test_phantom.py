"""phantom: a valid MSD Task01 layout, all tumour labels, deterministic, contrasts that differ by modality."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged

from splitunet.data.phantom import generate_phantom

FLAIR, T1, T1GD, T2 = range(4)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return generate_phantom(tmp_path_factory.mktemp("phantom"), 3, shape=(33, 40, 35), seed=7, progress=False)


def _case(root, index):
    entry = json.loads((root / "dataset.json").read_text())["training"][index]
    image = nib.load(root / entry["image"])
    label = nib.load(root / entry["label"])
    return image, label


def test_layout_reads_with_monai(phantom):
    dataset = json.loads((phantom / "dataset.json").read_text())
    assert dataset["numTraining"] == len(dataset["training"]) == 3
    assert dataset["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    loader = LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True)
    for entry in dataset["training"]:
        sample = loader({"image": str(phantom / entry["image"]), "label": str(phantom / entry["label"])})
        assert tuple(sample["image"].shape) == (4, 33, 40, 35)
        assert tuple(sample["label"].shape) == (1, 33, 40, 35)


def test_every_case_has_all_three_tumour_labels_and_valid_affine(phantom):
    for index in range(3):
        image, label = _case(phantom, index)
        values = set(np.unique(np.asarray(label.dataobj)).tolist())
        assert values == {0, 1, 2, 3}
        assert np.allclose(image.affine, label.affine)
        assert np.isfinite(image.affine).all() and abs(np.linalg.det(image.affine[:3, :3])) > 0


def test_deterministic_by_seed(tmp_path):
    first = generate_phantom(tmp_path / "a", 1, shape=(32, 32, 32), seed=3, progress=False)
    second = generate_phantom(tmp_path / "b", 1, shape=(32, 32, 32), seed=3, progress=False)
    other = generate_phantom(tmp_path / "c", 1, shape=(32, 32, 32), seed=4, progress=False)
    a, b, c = (np.asarray(_case(root, 0)[0].dataobj) for root in (first, second, other))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_modalities_show_different_compartments(phantom):
    image, label = _case(phantom, 0)
    data = np.asarray(image.dataobj, dtype=np.float32)
    labels = np.asarray(label.dataobj)
    channels = data.reshape(-1, 4).T
    correlation = np.corrcoef(channels)
    assert (correlation[np.triu_indices(4, 1)] < 0.99).all()

    def mean(channel, mask):
        return float(data[..., channel][mask].mean())

    oedema, core, enhancing = labels == 1, labels == 2, labels == 3
    brain = (labels == 0) & (data[..., T1] > np.percentile(data[..., T1], 60))
    assert mean(FLAIR, oedema) > mean(FLAIR, brain)  # oedema bright in FLAIR
    assert mean(T2, oedema) > mean(T2, brain)  # and in T2
    assert mean(T1GD, enhancing) / mean(T1GD, brain) > mean(T1, enhancing) / mean(T1, brain)  # rim enhances
    assert mean(T1, core) < mean(T1, brain)  # core dark in T1


@pytest.mark.parametrize("kwargs", [{"num_cases": 0}, {"num_cases": 1, "shape": (8, 32, 32)}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_phantom(tmp_path, **kwargs)
