"""hospitals: one MSD data set per hospital, disjoint case IDs and seeds, and profiles that differ measurably."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from splitunet.data.hospitals import NON_IID_PROFILES, HospitalProfile, generate_hospitals
from splitunet.data.partition import partition_msd
from splitunet.data.phantom import synthesize_case

SHAPE = (24, 24, 24)
CASES = 3
FLAIR, T1 = 0, 1


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospitals")
    roots = generate_hospitals(root, NON_IID_PROFILES, cases_per_hospital=CASES, shape=SHAPE, seed=0, progress=False)
    return root, roots


def _cases(root):
    """``(case number, image, label)`` of every case of one hospital's data set, as written."""
    dataset = json.loads((root / "dataset.json").read_text())
    for entry in dataset["training"]:
        number = int(entry["image"].rsplit("_", 1)[1].split(".")[0])
        image = np.asarray(nib.load(root / entry["image"]).dataobj)
        label = np.asarray(nib.load(root / entry["label"]).dataobj)
        yield number, image, label


def _twin(profile, seed, number, **reset):
    """The same case of the same hospital with some knobs back at 1.0: what those knobs alone changed."""
    return synthesize_case(number, SHAPE, seed=seed, **{**profile.phantom_options(), **reset})


def _seeds(root):
    return {entry["name"]: entry["seed"] for entry in json.loads((root / "hospitals.json").read_text())["hospitals"]}


def test_one_msd_data_set_per_hospital_with_disjoint_case_ids_and_seeds(hospitals, tmp_path):
    root, roots = hospitals
    names = [profile.name for profile in NON_IID_PROFILES]
    assert list(roots) == names and all(roots[name] == root / name for name in names)
    ids = {
        name: {entry["image"] for entry in json.loads((roots[name] / "dataset.json").read_text())["training"]}
        for name in names
    }
    assert all(len(ids[name]) == CASES for name in names)
    assert len(set.union(*ids.values())) == CASES * len(names)  # no case ID twice
    assert len(set(_seeds(root).values())) == len(names)
    # The repository's partitioner takes a hospital's data set as it takes any MSD one.
    partition_msd(roots["hospital_b"], tmp_path / "parties", progress=False)
    assert len(list((tmp_path / "parties" / "labels").glob("*.nii.gz"))) == CASES


def test_tumour_size_follows_the_profiles(hospitals):
    root, roots = hospitals
    seeds = _seeds(root)
    mean_fraction, growth = {}, {}
    for profile in NON_IID_PROFILES:
        fractions, ratios = [], []
        for number, _, label in _cases(roots[profile.name]):
            twin_label = _twin(profile, seeds[profile.name], number, tumour_size_scale=1.0)[1]
            fractions.append(np.count_nonzero(label) / label.size)
            ratios.append(np.count_nonzero(label) / np.count_nonzero(twin_label))
        mean_fraction[profile.name], growth[profile.name] = np.mean(fractions), np.mean(ratios)
    by_scale = sorted(NON_IID_PROFILES, key=lambda p: p.tumour_size_scale)
    # Against the same cases at scale 1: the tumour grows and shrinks in the order of the scales, and not at 1.
    assert [growth[p.name] for p in by_scale] == sorted(growth.values())
    assert growth[by_scale[0].name] < 0.9 and growth[by_scale[-1].name] > 1.2
    assert all(growth[p.name] == 1.0 for p in NON_IID_PROFILES if p.tumour_size_scale == 1.0)
    # Between hospitals (different cases), the largest scale still gives clearly the largest tumours.
    assert mean_fraction[by_scale[-1].name] > 1.15 * mean_fraction[by_scale[0].name]


def test_raw_intensities_follow_intensity_scale(hospitals):
    root, roots = hospitals
    seeds = _seeds(root)
    brain_means = {}
    for profile in NON_IID_PROFILES:
        means = []
        for number, image, label in _cases(roots[profile.name]):
            twin = _twin(profile, seeds[profile.name], number, intensity_scale=1.0)[0]
            assert np.allclose(image, profile.intensity_scale * twin, rtol=1e-5, atol=1e-3)
            means.append(image[_normal_brain(image, label)].mean())
        brain_means[profile.name] = np.mean(means)
    by_scale = sorted(NON_IID_PROFILES, key=lambda p: p.intensity_scale)
    assert [brain_means[p.name] for p in by_scale] == sorted(brain_means.values())
    normalised = [brain_means[p.name] / p.intensity_scale for p in NON_IID_PROFILES]
    assert max(brain_means.values()) > 3 * min(brain_means.values())  # raw: a factor 4 apart
    assert max(normalised) < 1.5 * min(normalised)  # per unit of scale: alike


def _normal_brain(image, label):
    return (label == 0) & (image[..., T1] > np.percentile(image[..., T1], 60))


def _oedema_contrast(image, label):
    """Oedema against normal brain in FLAIR, where oedema is bright."""
    return image[..., FLAIR][label == 1].mean() / image[..., FLAIR][_normal_brain(image, label)].mean()


def test_tissue_contrast_follows_contrast_scale(hospitals):
    root, roots = hospitals
    seeds = _seeds(root)
    change = {}
    for profile in NON_IID_PROFILES:
        ratios = []
        for number, image, label in _cases(roots[profile.name]):
            twin = _twin(profile, seeds[profile.name], number, contrast_scale=1.0)[0]
            ratios.append(_oedema_contrast(image, label) / _oedema_contrast(twin, label))
        change[profile.name] = np.mean(ratios)
    by_scale = sorted(NON_IID_PROFILES, key=lambda p: p.contrast_scale)
    assert [change[p.name] for p in by_scale] == sorted(change.values())
    assert change[by_scale[0].name] < 0.95 and change[by_scale[-1].name] > 1.05
    assert all(change[p.name] == 1.0 for p in NON_IID_PROFILES if p.contrast_scale == 1.0)


def test_the_profiles_differ_in_every_knob_and_are_recorded(hospitals):
    root, _ = hospitals
    knobs = NON_IID_PROFILES[0].phantom_options()
    for knob in knobs:
        assert len({profile.phantom_options()[knob] for profile in NON_IID_PROFILES}) >= 2, knob
    recorded = json.loads((root / "hospitals.json").read_text())["hospitals"]
    assert [{k: entry[k] for k in knobs} for entry in recorded] == [p.phantom_options() for p in NON_IID_PROFILES]
    assert json.loads((root / "hospital_a" / "dataset.json").read_text())["phantom"]["variation"] == knobs


def test_case_counts_per_hospital(tmp_path):
    profiles = [HospitalProfile("small", tumour_size_scale=0.8), HospitalProfile("large", intensity_scale=3.0)]
    roots = generate_hospitals(tmp_path, profiles, cases_per_hospital=[1, 2], shape=SHAPE, seed=5, progress=False)
    numbers = {name: [number for number, _, _ in _cases(path)] for name, path in roots.items()}
    assert numbers == {"small": [1], "large": [2, 3]}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda path: HospitalProfile("a/b"), "name"),
        (lambda path: HospitalProfile("a", tumour_size_scale=0), "tumour_size_scale"),
        (lambda path: generate_hospitals(path, [HospitalProfile("a"), HospitalProfile("a")], 1, SHAPE), "distinct"),
        (lambda path: generate_hospitals(path, NON_IID_PROFILES, [1, 2], SHAPE), "2 counts for 3"),
        (lambda path: generate_hospitals(path, NON_IID_PROFILES, 0, SHAPE), ">= 1"),
        (lambda path: generate_hospitals(path, [], 1, SHAPE), "non-empty"),
    ],
)
def test_bad_arguments_are_refused(make, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        make(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
