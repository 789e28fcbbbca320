"""data.site_groups: a partition's patients dealt to groups of sites (or put in the groups given), every patient in at
most one group."""

from __future__ import annotations

import json

import pytest

from splitunet.data.nifti_io import nifti_case_id
from splitunet.data.party_data import ModalityFolder
from splitunet.data.site_groups import group_sites, split_patients, write_groups
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


def test_given_groups_are_written_as_given_and_a_patient_left_out_is_in_no_folder(tiny_parties, tmp_path):
    first, second, third = _cases(tiny_parties / "labels")
    folders = write_groups(tiny_parties, tmp_path / "groups", [[third, first], [second]])
    assert [folder.name for folder in folders] == ["group-1", "group-2"]
    for modality in MODALITIES:
        assert _cases(folders[0] / modality) == [first, third]
        assert _cases(folders[1] / modality) == [second]
    # Rewritten, not added to: the second assignment leaves the first's patients out.
    folders = write_groups(tiny_parties, tmp_path / "groups", [[first], [third]])
    assert [_cases(folder / "t1gd") for folder in folders] == [[first], [third]]


@pytest.mark.parametrize(
    "groups, message",
    [
        ([["A"], []], "group-2 has no patient"),
        ([["A", "B"], ["B"]], "is in group-1 and group-2"),
        ([["A"], ["BRATS_999"]], "BRATS_999 of group-2 is not in"),
        ([], "num_groups must be an int >= 1"),
    ],
)
def test_malformed_groups_are_refused(tiny_parties, tmp_path, groups, message):
    first, second, _ = _cases(tiny_parties / "labels")
    groups = [[{"A": first, "B": second}.get(case, case) for case in members] for members in groups]
    with pytest.raises(ValueError, match=message):
        write_groups(tiny_parties, tmp_path / "groups", groups)


def test_a_splitfed_run_takes_one_group_per_site_of_a_modality():
    from splitunet.tools.splitfed_demo import SplitFedDemoSettings

    assert SplitFedDemoSettings(sites_per_modality=2, groups=[["A"], ["B"]]).groups == [["A"], ["B"]]
    assert SplitFedDemoSettings().groups is None  # the default deals the patients
    with pytest.raises(ValueError, match="3 groups of patients for 2 sites per modality"):
        SplitFedDemoSettings(sites_per_modality=2, groups=[["A"], ["B"], ["C"]])
