"""party_settings: each party finds its own data from site-local settings, with clear errors."""

from __future__ import annotations

import json

import pytest

from splitunet.data.party_settings import (
    SETTINGS_ENV_VAR,
    load_server_settings,
    load_site_settings,
    write_settings,
)
from splitunet.errors import SplitUNetConfigError


@pytest.fixture
def local_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(SETTINGS_ENV_VAR, raising=False)
    local = tmp_path / "local"
    local.mkdir()
    write_settings(
        local / "splitunet_site.json",
        {
            "site-1": {"modality": "flair", "data_dir": "../data/flair"},
            "server": {"labels_dir": "/abs/labels", "layout": "brats2021"},
        },
        case_key_secret="s3cret",
    )
    return local


def test_site_reads_its_own_entry_with_relative_path(local_dir):
    settings = load_site_settings("site-1", local_dir)
    assert settings.modality == "flair"
    assert settings.data_dir == (local_dir.parent / "data" / "flair").resolve()
    assert settings.case_key_secret == "s3cret"


def test_server_falls_back_to_the_server_entry(local_dir):
    settings = load_server_settings("simulator_server", local_dir)
    assert str(settings.labels_dir) == "/abs/labels" and settings.layout == "brats2021"


def test_environment_variable_wins(local_dir, tmp_path, monkeypatch):
    other = tmp_path / "other.json"
    write_settings(other, {"site-1": {"modality": "t2", "data_dir": "/d"}}, "k")
    monkeypatch.setenv(SETTINGS_ENV_VAR, str(other))
    assert load_site_settings("site-1", local_dir).modality == "t2"


def test_missing_settings_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv(SETTINGS_ENV_VAR, raising=False)
    with pytest.raises(SplitUNetConfigError, match="splitunet_site.json"):
        load_site_settings("site-1", tmp_path)


def test_unknown_party_lists_the_known_ones(local_dir):
    with pytest.raises(SplitUNetConfigError, match="site-9.*site-1"):
        load_site_settings("site-9", local_dir)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"modality": "pd", "data_dir": "/d"}, "modality"),
        ({"modality": "t1"}, "data_dir"),
    ],
)
def test_bad_entries(tmp_path, monkeypatch, entry, message):
    monkeypatch.delenv(SETTINGS_ENV_VAR, raising=False)
    write_settings(tmp_path / "splitunet_site.json", {"site-1": entry}, "k")
    with pytest.raises(SplitUNetConfigError, match=message):
        load_site_settings("site-1", tmp_path)


def test_missing_secret_and_bad_json(tmp_path, monkeypatch):
    monkeypatch.delenv(SETTINGS_ENV_VAR, raising=False)
    (tmp_path / "splitunet_site.json").write_text(
        json.dumps({"parties": {"site-1": {"modality": "t1", "data_dir": "/d"}}})
    )
    with pytest.raises(SplitUNetConfigError, match="case_key_secret"):
        load_site_settings("site-1", tmp_path)
    (tmp_path / "splitunet_site.json").write_text("{not json")
    with pytest.raises(SplitUNetConfigError, match="not valid JSON"):
        load_site_settings("site-1", tmp_path)


def test_checkpoint_dir_is_optional_and_resolved(tmp_path, monkeypatch):
    monkeypatch.delenv(SETTINGS_ENV_VAR, raising=False)
    entries = {
        "site-1": {"modality": "t1", "data_dir": "/d", "checkpoint_dir": "ckpt/site-1"},
        "site-2": {"modality": "t2", "data_dir": "/d"},
        "server": {"labels_dir": "/l", "checkpoint_dir": "/abs/ckpt"},
    }
    write_settings(tmp_path / "splitunet_site.json", entries, "k")
    assert load_site_settings("site-1", tmp_path).checkpoint_dir == (tmp_path / "ckpt" / "site-1").resolve()
    assert load_site_settings("site-2", tmp_path).checkpoint_dir is None
    assert str(load_server_settings("server", tmp_path).checkpoint_dir) == "/abs/ckpt"
    entries["site-2"]["checkpoint_dir"] = ""
    write_settings(tmp_path / "splitunet_site.json", entries, "k")
    with pytest.raises(SplitUNetConfigError, match="checkpoint_dir"):
        load_site_settings("site-2", tmp_path)


def test_encoder_seed_is_a_site_local_int(tmp_path, monkeypatch):
    monkeypatch.delenv(SETTINGS_ENV_VAR, raising=False)
    entries = {"site-1": {"modality": "t1", "data_dir": "/d", "encoder_seed": 123456}}
    write_settings(tmp_path / "splitunet_site.json", entries, "k")
    assert load_site_settings("site-1", tmp_path).encoder_seed == 123456
    for bad in (-1, "7", 1.5, True):
        entries["site-1"]["encoder_seed"] = bad
        write_settings(tmp_path / "splitunet_site.json", entries, "k")
        with pytest.raises(SplitUNetConfigError, match="encoder_seed"):
            load_site_settings("site-1", tmp_path)
