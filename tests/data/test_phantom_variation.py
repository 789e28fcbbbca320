"""phantom knobs: the defaults reproduce the phantom as it was; each knob changes what it says, on the same case."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from splitunet.data.phantom import generate_phantom, synthesize_case

SHAPE = (24, 24, 24)
FLAIR, T1 = 0, 1


def _case(**knobs):
    return synthesize_case(1, SHAPE, seed=0, **knobs)


@pytest.fixture(scope="module")
def default_case():
    return _case()


def _normal_brain(image, label):
    return (label == 0) & (image[..., T1] > np.percentile(image[..., T1], 60))


def test_the_default_phantom_is_unchanged(default_case):
    image, label, _ = default_case
    # Recorded from the generator before the knobs existed (the arrays were then also compared bit for bit).
    assert np.bincount(label.ravel(), minlength=4).tolist() == [13532, 111, 30, 151]
    means = image.reshape(-1, 4).astype(np.float64).mean(axis=0)
    assert np.allclose(
        means, [168.41255936702643, 124.06920737527737, 252.39542782322624, 134.19660774833108], rtol=1e-5
    )
    ones = dict(tumour_size_scale=1.0, intensity_scale=1, contrast_scale=1.0, bias_field_strength=1.0, noise_scale=1)
    explicit = _case(**ones)
    assert np.array_equal(explicit[0], image) and np.array_equal(explicit[1], label)


def test_tumour_size_scale_grows_the_tumour(default_case):
    sizes = [np.count_nonzero(_case(tumour_size_scale=s)[1]) for s in (0.6, 0.8)]
    sizes += [np.count_nonzero(default_case[1])]
    sizes += [np.count_nonzero(_case(tumour_size_scale=s)[1]) for s in (1.3, 1.6)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert sizes[-1] > 1.4 * sizes[0]


def test_intensity_scale_multiplies_the_raw_intensities_only(default_case):
    image, label, _ = _case(intensity_scale=2.5)
    assert np.array_equal(label, default_case[1])
    assert np.allclose(image, 2.5 * default_case[0], rtol=1e-5, atol=1e-4)


def test_contrast_scale_spreads_the_tissues_apart():
    ratios = []
    for scale in (0.7, 1.0, 1.4):
        image, label, _ = _case(contrast_scale=scale)
        brain = _normal_brain(image, label)
        ratios.append(image[..., FLAIR][label == 1].mean() / image[..., FLAIR][brain].mean())  # oedema bright
    assert ratios[0] < ratios[1] < ratios[2], ratios
    assert np.array_equal(_case(contrast_scale=1.4)[1], _case(contrast_scale=0.7)[1])  # same tumour


def test_bias_field_strength_scales_the_log_field(default_case):
    flat = _case(bias_field_strength=0.0)[0]
    bright = flat > 0.5 * flat.max(axis=(0, 1, 2))  # signal far above the noise: the ratio is the field
    spread = [np.log(_case(bias_field_strength=s)[0][bright] / flat[bright]).std() for s in (1.0, 2.0)]
    assert spread[0] == pytest.approx(np.log(default_case[0][bright] / flat[bright]).std())
    assert 0.02 < spread[0] and spread[1] / spread[0] == pytest.approx(2.0, rel=0.1)


def test_noise_scale_scales_the_background_noise(default_case):
    silent = _case(noise_scale=0.0)[0]
    outside = silent == 0  # no tissue and no noise: exactly 0
    assert outside.mean() > 0.2
    assert (default_case[0][outside] > 0).all()  # Rayleigh background at the default noise
    loud = _case(noise_scale=2.0)[0]
    assert np.allclose(loud[outside], 2.0 * default_case[0][outside], rtol=1e-5)


@pytest.mark.parametrize(
    "knobs",
    [
        {"tumour_size_scale": 0.0},
        {"intensity_scale": -1.0},
        {"contrast_scale": float("nan")},
        {"bias_field_strength": -0.1},
        {"noise_scale": True},
        {"tumour_size_scale": "2"},
    ],
)
def test_bad_knobs_are_refused(knobs):
    with pytest.raises(ValueError, match=next(iter(knobs))):
        _case(**knobs)


def test_generate_phantom_numbers_cases_from_first_index_and_records_the_variation(tmp_path):
    varied = generate_phantom(tmp_path / "varied", 2, SHAPE, seed=0, progress=False, first_index=4, noise_scale=0.5)
    dataset = json.loads((varied / "dataset.json").read_text())
    assert [entry["image"] for entry in dataset["training"]] == [
        "./imagesTr/BRATS_004.nii.gz",
        "./imagesTr/BRATS_005.nii.gz",
    ]
    assert dataset["phantom"]["variation"]["noise_scale"] == 0.5
    written = np.asarray(nib.load(varied / "imagesTr" / "BRATS_005.nii.gz").dataobj)
    assert np.array_equal(written, synthesize_case(5, SHAPE, seed=0, noise_scale=0.5)[0])
    plain = generate_phantom(tmp_path / "plain", 1, SHAPE, seed=0, progress=False)
    assert "variation" not in json.loads((plain / "dataset.json").read_text())["phantom"]
