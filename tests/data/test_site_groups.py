"""data.site_groups: a partition's patients dealt to groups of sites, every patient in exactly one group."""

from __future__ import annotations

import json

import pytest

from splitunet.data.nifti_io import nifti_case_id
from splitunet.data.party_data import ModalityFolder
from splitunet.data.site_groups import group_sites, split_patients
from splitunet.wire.protocol import MODALITIES


def _cases(folder):
    return sorted(filter(None, (nifti_case_id(path) for path in folder.iterdir())))


def test_every_patient_goes_to_one_group_with_all_its_modalities(tiny_parties, tmp_path):
    folders = split_patients(tiny_parties, tmp_path / "groups", num_groups=2, seed=1)
    assert [folder.name for folder in folders] == ["group-1", "group-2"]
    dealt = [_cases(folder / "flair") for folder in folders]
    assert sorted(len(cases) for cases in dealt) == [1, 2]  # 3 patients, sizes differ by at most one
    assert sorted(dealt[0] + dealt[1]) == _cases(tiny_parties / "labels")
    for folder, cases in zip(folders, dealt):
        for modality in MODALITIES:
            assert _cases(folder / modality) == cases
            assert json.loads((folder / modality / "party.json").read_text())["cases"] == cases
            # A site reads its group's folder as it reads a partition's.
            assert ModalityFolder(folder / modality, modality, party="site").case_ids == cases
    again = split_patients(tiny_parties, tmp_path / "groups", num_groups=2, seed=1)
    assert [_cases(folder / "t2") for folder in again] == dealt


def test_sites_are_named_group_by_group_and_too_many_groups_are_refused(tiny_parties, tmp_path):
    sites = group_sites(2)
    assert list(sites)[:5] == ["site-1", "site-2", "site-3", "site-4", "site-5"]
    assert sites["site-1"] == ("flair", 0) and sites["site-8"] == ("t2", 1)
    with pytest.raises(ValueError, match="3 patients cannot fill 4 groups"):
        split_patients(tiny_parties, tmp_path / "groups", num_groups=4)
    with pytest.raises(ValueError, match="num_groups must be an int >= 1"):
        group_sites(0)
