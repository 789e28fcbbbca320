"""Keyed case hashes and matching cases across any number of parties."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from splitunet.data.case_keys import KEY_LENGTH, CaseMatch, PrivateNames, case_key, match_case_keys, scrub_private
from splitunet.errors import SplitUNetDataError


def test_case_key_is_truncated_hmac_sha256():
    expected = hmac.new(b"s3cret", b"BRATS_001", hashlib.sha256).hexdigest()[:32]
    assert case_key("BRATS_001", "s3cret") == expected
    assert KEY_LENGTH == 32 and len(expected) == 32


def test_case_key_depends_on_secret_and_id():
    assert case_key("BRATS_001", "a") != case_key("BRATS_001", "b")
    assert case_key("BRATS_001", "a") != case_key("BRATS_002", "a")
    assert case_key("BRATS_001", "a") == case_key("BRATS_001", "a")
    # Not a plain hash of the ID, which anyone could check against guessed IDs.
    assert case_key("BRATS_001", "a") != hashlib.sha256(b"BRATS_001").hexdigest()[:32]


@pytest.mark.parametrize("case_id, secret", [("BRATS_001", ""), ("", "secret"), ("BRATS_001", None)])
def test_case_key_rejects_empty(case_id, secret):
    with pytest.raises(ValueError):
        case_key(case_id, secret)


def test_match_two_parties():
    match = match_case_keys({"site-1": ["b", "a", "c"], "site-2": iter(["c", "a"])})
    assert match == CaseMatch(common=["a", "c"], missing={"site-2": ["b"]})


def test_match_many_parties():
    keys = {
        "site-1": {"k1", "k2", "k3", "k4"},
        "site-2": {"k1", "k2", "k4", "k5"},
        "site-3": {"k1", "k2", "k3", "k4", "k5"},
        "site-4": {"k2", "k1", "k4"},
        "server": {"k1", "k2", "k3", "k4", "k5"},
    }
    match = match_case_keys(keys)
    assert match.common == ["k1", "k2", "k4"]
    assert match.missing == {"site-1": ["k5"], "site-2": ["k3"], "site-4": ["k3", "k5"]}


def test_match_single_party_and_all_equal():
    assert match_case_keys({"only": ["b", "a"]}) == CaseMatch(common=["a", "b"], missing={})
    match = match_case_keys({p: ["x", "y"] for p in ("s1", "s2", "s3")})
    assert match.common == ["x", "y"] and match.missing == {}


def test_match_disjoint_parties():
    match = match_case_keys({"s1": ["a"], "s2": ["b"], "s3": []})
    assert match.common == []
    assert match.missing == {"s1": ["b"], "s2": ["a"], "s3": ["a", "b"]}


def test_match_errors():
    with pytest.raises(ValueError, match="at least one party"):
        match_case_keys({})
    with pytest.raises(SplitUNetDataError, match="more than once: a") as info:
        match_case_keys({"site-1": ["a", "b", "a"], "site-2": ["a"]})
    assert info.value.party == "site-1"


def test_keys_of_real_ids_match():
    ids = [f"BRATS_{i:03d}" for i in range(1, 6)]
    site_1 = [case_key(i, "shared") for i in ids]
    site_2 = [case_key(i, "shared") for i in ids[1:]]
    match = match_case_keys({"site-1": site_1, "site-2": site_2})
    assert match.common == sorted(site_2)
    assert match.missing == {"site-2": [case_key("BRATS_001", "shared")]}


def test_keys_to_case_ids_maps_back_and_reports_collisions(monkeypatch):
    from splitunet.data import case_keys

    mapping = case_keys.keys_to_case_ids(["BRATS_001", "BRATS_002"], "s", party="site-1")
    assert mapping == {case_key(case_id, "s"): case_id for case_id in ("BRATS_001", "BRATS_002")}
    monkeypatch.setattr(case_keys, "case_key", lambda case_id, secret: "same")
    with pytest.raises(SplitUNetDataError, match="site-1"):
        case_keys.keys_to_case_ids(["A", "B"], "s", party="site-1")


def test_scrub_replaces_paths_under_private_folders_and_case_ids_by_keys(tmp_path):
    data = tmp_path / "flair"
    keys = {"BRATS_001": "k1", "BRATS_0010": "k10"}
    text = (
        f"[party=site-1, case=BRATS_001, file={data}/BRATS_001.nii.gz] bad header; also {data}, {data}2/x, "
        "BRATS_0010 and 'BRATS_001'"
    )
    assert scrub_private(text, keys, [("data_dir", data)]) == (
        "[party=site-1, case=<case key k1>, file=<data_dir>] bad header; also <data_dir>, "
        # A sibling folder that merely starts alike is not private; the longer ID is not half replaced.
        f"{data}2/x, <case key k10> and '<case key k1>'"
    )


def test_scrub_knows_a_folder_by_its_resolved_path_too(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert (
        scrub_private(f"cannot read {real}/a.nii.gz", {}, [("data_dir", tmp_path / "link")]) == "cannot read <data_dir>"
    )
    assert scrub_private("nothing private here", {"BRATS_001": "k"}, [("data_dir", "/data")]) == "nothing private here"


def test_private_names_key_cases_with_the_secret_as_they_become_known():
    names = PrivateNames()
    assert names.key("BRATS_001") is None  # no secret yet: nothing to key with
    names.use_secret("s3cret")
    names.add_dir("data_dir", "/data/flair")
    names.add_cases(["BRATS_001"])
    key = case_key("BRATS_001", "s3cret")
    assert names.scrub("case BRATS_001 in /data/flair/BRATS_001.nii.gz") == f"case <case key {key}> in <data_dir>"
    assert names.key("BRATS_002") == case_key("BRATS_002", "s3cret")
    assert "BRATS_002" not in names.scrub("BRATS_002")  # a case met in an error is remembered
