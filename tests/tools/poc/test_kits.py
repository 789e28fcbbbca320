"""poc.kits: project file, free port and per-party local folders (no FLARE started)."""

from __future__ import annotations

import json
import socket

from splitunet.data.party_settings import SETTINGS_FILE_NAME, load_server_settings, load_site_settings
from splitunet.tools.deployment import ALLOWED_CLASSES
from splitunet.tools.poc import (
    ADMIN_USER,
    LOOPBACK_HOST,
    find_free_port,
    party_settings_entry,
    poc_project_config,
    write_party_local,
)


def test_free_port_is_bindable_on_loopback():
    port = find_free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_HOST, port))


def test_project_config_names_server_admin_and_sites_on_one_port():
    config = poc_project_config(["site-a", "site-b"], 40123)
    by_type = {}
    for participant in config["participants"]:
        by_type.setdefault(participant["type"], []).append(participant)
    (server,) = by_type["server"]
    assert server["name"] == "server" and server["fed_learn_port"] == server["admin_port"] == 40123
    assert [admin["name"] for admin in by_type["admin"]] == [ADMIN_USER]
    assert by_type["admin"][0]["role"] == "project_admin"
    assert [client["name"] for client in by_type["client"]] == ["site-a", "site-b"]
    assert any(builder["path"].endswith("CertBuilder") for builder in config["builders"])


def test_party_local_holds_only_its_own_entry_and_keeps_flare_defaults(tmp_path, monkeypatch, sites, site_privacy):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    local = tmp_path / "site-2" / "local"
    local.mkdir(parents=True)
    default = {"format_version": 2, "class_allow_list": ["nvflare."], "components": [{"id": "process_launcher"}]}
    (local / "resources.json.default").write_text(json.dumps(default))
    entry = party_settings_entry("site-2", sites, tmp_path / "parties", "msd")
    write_party_local(local, "site-2", entry, "secret", site_privacy)

    settings = json.loads((local / SETTINGS_FILE_NAME).read_text())
    assert list(settings["parties"]) == ["site-2"]
    site = load_site_settings("site-2", local)
    assert site.modality == "t1" and site.data_dir == (tmp_path / "parties" / "t1").resolve()
    resources = json.loads((local / "resources.json").read_text())
    assert resources["components"] == default["components"]  # FLARE reads resources.json *instead of* the default
    assert resources["class_allow_list"] == ["nvflare.", *ALLOWED_CLASSES]
    assert json.loads((local / "privacy.json").read_text()) == site_privacy


def test_server_entry_names_labels_and_layout(tmp_path, monkeypatch, sites):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    entry = party_settings_entry("server", sites, tmp_path / "parties", "brats2021")
    write_party_local(tmp_path / "local", "server", entry, "secret")
    server = load_server_settings("server", tmp_path / "local")
    assert server.labels_dir == (tmp_path / "parties" / "labels").resolve() and server.layout == "brats2021"
    assert not (tmp_path / "local" / "privacy.json").exists()
