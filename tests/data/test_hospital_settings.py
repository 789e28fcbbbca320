"""data.hospital_settings: a hospital finds its dataset and checkpoint folders in its own site-local settings."""

from __future__ import annotations

import json

import pytest

from splitunet.data.hospital_settings import load_hospital_settings
from splitunet.data.party_settings import SETTINGS_ENV_VAR, SETTINGS_FILE_NAME, load_site_settings
from splitunet.errors import SplitUNetConfigError


@pytest.fixture(autouse=True)
def no_settings_override(monkeypatch):
    monkeypatch.delenv(SETTINGS_ENV_VAR, raising=False)


def _write(local, parties) -> None:
    local.mkdir(parents=True, exist_ok=True)
    (local / SETTINGS_FILE_NAME).write_text(json.dumps({"parties": parties}))


def test_the_entry_gives_the_folder_resolved_against_the_settings_file_and_the_layout(tmp_path):
    _write(
        tmp_path / "local",
        {
            "hospital-a": {"hospital_dir": "../data/a"},
            "hospital-b": {"hospital_dir": str(tmp_path / "b"), "layout": "brats2023"},
        },
    )
    a = load_hospital_settings("hospital-a", tmp_path / "local")
    assert (a.party, a.data_dir, a.layout) == ("hospital-a", (tmp_path / "data" / "a").resolve(), "msd")
    assert a.source == tmp_path / "local" / SETTINGS_FILE_NAME and a.checkpoint_dir is None
    assert load_hospital_settings("hospital-b", tmp_path / "local").layout == "brats2023"


def test_an_optional_checkpoint_folder_is_resolved_like_the_data_folder(tmp_path):
    _write(tmp_path / "local", {"hospital-a": {"hospital_dir": "/data/a", "checkpoint_dir": "../checkpoints"}})
    settings = load_hospital_settings("hospital-a", tmp_path / "local")
    assert settings.checkpoint_dir == (tmp_path / "checkpoints").resolve()


def test_one_institution_entry_serves_a_hospital_and_a_modality_site(tmp_path):
    # hospital_dir is a key of its own, so the split jobs' data_dir (one modality) can sit beside it.
    local = tmp_path / "local"
    local.mkdir()
    entry = {"hospital_dir": "/data/a", "modality": "flair", "data_dir": "/data/a_flair", "layout": "brats2021"}
    (local / SETTINGS_FILE_NAME).write_text(json.dumps({"case_key_secret": "s", "parties": {"hospital-a": entry}}))
    assert str(load_hospital_settings("hospital-a", local).data_dir) == "/data/a"
    assert str(load_site_settings("hospital-a", local).data_dir) == "/data/a_flair"


def test_the_environment_variable_names_another_file(tmp_path, monkeypatch):
    _write(tmp_path / "elsewhere", {"hospital-a": {"hospital_dir": "/data/a"}})
    monkeypatch.setenv(SETTINGS_ENV_VAR, str(tmp_path / "elsewhere" / SETTINGS_FILE_NAME))
    assert str(load_hospital_settings("hospital-a", tmp_path / "local").data_dir) == "/data/a"


@pytest.mark.parametrize(
    "parties, message",
    [
        (
            {"hospital-b": {"hospital_dir": "/data/b"}},
            "no entry for hospital 'hospital-a' \\(has: \\['hospital-b'\\]\\)",
        ),
        # A split site's entry (one modality) is not a hospital's.
        (
            {"hospital-a": {"modality": "flair", "data_dir": "/data/flair"}},
            "hospital 'hospital-a' needs 'hospital_dir'",
        ),
        ({"hospital-a": {"hospital_dir": "/data/a", "layout": "nifti"}}, "has layout 'nifti'"),
        (
            {"hospital-a": {"hospital_dir": "/data/a", "checkpoint_dir": 3}},
            "hospital 'hospital-a' has checkpoint_dir 3; expected a folder path",
        ),
    ],
)
def test_a_bad_entry_names_the_file_and_the_hospital(tmp_path, parties, message):
    _write(tmp_path / "local", parties)
    with pytest.raises(SplitUNetConfigError, match=message) as caught:
        load_hospital_settings("hospital-a", tmp_path / "local")
    assert SETTINGS_FILE_NAME in str(caught.value)


def test_no_settings_file_says_where_it_was_expected(tmp_path):
    with pytest.raises(SplitUNetConfigError, match=f"no site settings at {tmp_path / 'local' / SETTINGS_FILE_NAME}"):
        load_hospital_settings("hospital-a", tmp_path / "local")


@pytest.mark.parametrize("text", ["{not json", json.dumps({"hospital-a": {"hospital_dir": "/data/a"}})])
def test_a_file_that_is_not_a_settings_file_is_named(tmp_path, text):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / SETTINGS_FILE_NAME).write_text(text)
    with pytest.raises(SplitUNetConfigError, match=SETTINGS_FILE_NAME):
        load_hospital_settings("hospital-a", tmp_path / "local")
