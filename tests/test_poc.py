"""poc: project file, loopback pinning, per-party local folders and the harness's own checks (no FLARE started)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from splitunet.deployment import ALLOW_LIST_PREFIX, default_site_modalities
from splitunet.party_settings import SETTINGS_FILE_NAME, load_server_settings, load_site_settings
from splitunet.poc import (
    ADMIN_USER,
    LOOPBACK_HOST,
    PocConsortium,
    PocError,
    PocTimeouts,
    _call_bounded,
    find_free_port,
    party_settings_entry,
    poc_project_config,
    write_party_local,
)

SITES = default_site_modalities(4)
SITE_PRIVACY = {"scopes": [{"name": "public", "task_result_filters": []}], "default_scope": "public"}


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


def test_party_local_holds_only_its_own_entry_and_keeps_flare_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    local = tmp_path / "site-2" / "local"
    local.mkdir(parents=True)
    default = {"format_version": 2, "class_allow_list": ["nvflare."], "components": [{"id": "process_launcher"}]}
    (local / "resources.json.default").write_text(json.dumps(default))
    entry = party_settings_entry("site-2", SITES, tmp_path / "parties", "msd")
    write_party_local(local, "site-2", entry, "secret", SITE_PRIVACY)

    settings = json.loads((local / SETTINGS_FILE_NAME).read_text())
    assert list(settings["parties"]) == ["site-2"]
    site = load_site_settings("site-2", local)
    assert site.modality == "t1" and site.data_dir == (tmp_path / "parties" / "t1").resolve()
    resources = json.loads((local / "resources.json").read_text())
    assert resources["components"] == default["components"]  # FLARE reads resources.json *instead of* the default
    assert resources["class_allow_list"] == ["nvflare.", ALLOW_LIST_PREFIX]
    assert json.loads((local / "privacy.json").read_text()) == SITE_PRIVACY


def test_server_entry_names_labels_and_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    entry = party_settings_entry("server", SITES, tmp_path / "parties", "brats2021")
    write_party_local(tmp_path / "local", "server", entry, "secret")
    server = load_server_settings("server", tmp_path / "local")
    assert server.labels_dir == (tmp_path / "parties" / "labels").resolve() and server.layout == "brats2021"
    assert not (tmp_path / "local" / "privacy.json").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"site_modalities": {"site-1": "dwi"}}, "modality 'dwi'"),
        ({"site_modalities": {"server": "flair"}}, "reserved"),
        ({"site_modalities": {}}, "at least one site"),
        ({"privacy_policies": {"site-9": {}}}, "site-9"),
        ({"case_key_secret": ""}, "case_key_secret"),
    ],
)
def test_invalid_arguments_fail_early(tmp_path, kwargs, message):
    arguments = {"site_modalities": SITES, "partition_dir": tmp_path, "case_key_secret": "k", **kwargs}
    with pytest.raises(PocError, match=message):
        PocConsortium(tmp_path / "ws", **arguments)


def test_timeouts_must_be_positive():
    with pytest.raises(PocError, match="stop_s"):
        PocTimeouts(stop_s=0)


def test_bounded_call_gives_up_and_passes_errors_through():
    with pytest.raises(PocError, match="slow thing did not finish within"):
        _call_bounded(lambda: time.sleep(5), 0.2, "slow thing")
    with pytest.raises(KeyError):
        _call_bounded(lambda: {}["missing"], 1.0, "lookup")
    assert _call_bounded(lambda: 7, 1.0, "seven") == 7


def test_prepare_provisions_loopback_kits_and_local_folders(tmp_path, monkeypatch):
    """Runs the real ``nvflare poc prepare`` (about a second; nothing is started)."""
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    poc = PocConsortium(tmp_path / "ws", SITES, tmp_path / "parties", "k", privacy_policies={"site-1": SITE_PRIVACY})
    prod = poc.prepare()
    address = f"{LOOPBACK_HOST}:{poc.port}"
    server = json.loads((prod / "server" / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server["service"]["target"] == address and server["admin_port"] == poc.port
    for site in SITES:
        client = json.loads((prod / site / "startup" / "fed_client.json").read_text())
        assert client["servers"][0]["service"]["target"] == address
        assert load_site_settings(site, prod / site / "local").modality == SITES[site]
    admin = json.loads((prod / ADMIN_USER / "startup" / "fed_admin.json").read_text())["admin"]
    assert (admin["host"], admin["port"]) == (LOOPBACK_HOST, poc.port)
    assert (prod / "site-1" / "local" / "privacy.json").is_file()
    assert not (prod / "site-2" / "local" / "privacy.json").exists()
    # The user's ~/.nvflare is left alone: the CLI's own records go into the consortium's workspace.
    assert (tmp_path / "ws" / "nvflare_home" / ".nvflare").is_dir()
    assert poc.stop().all_stopped  # nothing was started


def test_start_needs_prepare(tmp_path):
    with pytest.raises(PocError, match="prepare"):
        PocConsortium(tmp_path / "ws", SITES, tmp_path, "k").start()


def test_a_dead_party_is_named_with_its_log(tmp_path):
    poc = PocConsortium(tmp_path / "ws", SITES, tmp_path, "k")
    poc._processes["site-2"] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    poc._processes["site-2"].wait()
    with pytest.raises(PocError, match=r"site-2 exited \(code 3\) while testing; see .*site-2/log\.txt"):
        poc._raise_if_dead("while testing")
    report = poc.stop()
    assert report.all_stopped and not report.graceful  # no server to shut down through
