"""poc.consortium: argument checks, the real ``nvflare poc prepare``, and naming a dead party (nothing started)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitunet.data.party_settings import load_site_settings
from splitunet.tools.poc import ADMIN_USER, LOOPBACK_HOST, PocConsortium, PocError


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
def test_invalid_arguments_fail_early(tmp_path, sites, kwargs, message):
    arguments = {"site_modalities": sites, "partition_dir": tmp_path, "case_key_secret": "k", **kwargs}
    with pytest.raises(PocError, match=message):
        PocConsortium(tmp_path / "ws", **arguments)


def test_prepare_provisions_loopback_kits_and_local_folders(tmp_path, monkeypatch, sites, site_privacy):
    """Runs the real ``nvflare poc prepare`` (about a second; nothing is started)."""
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    poc = PocConsortium(tmp_path / "ws", sites, tmp_path / "parties", "k", privacy_policies={"site-1": site_privacy})
    prod = poc.prepare()
    address = f"{LOOPBACK_HOST}:{poc.port}"
    server = json.loads((prod / "server" / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server["service"]["target"] == address and server["admin_port"] == poc.port
    for site in sites:
        client = json.loads((prod / site / "startup" / "fed_client.json").read_text())
        assert client["servers"][0]["service"]["target"] == address
        assert load_site_settings(site, prod / site / "local").modality == sites[site]
    admin = json.loads((prod / ADMIN_USER / "startup" / "fed_admin.json").read_text())["admin"]
    assert (admin["host"], admin["port"]) == (LOOPBACK_HOST, poc.port)
    assert (prod / "site-1" / "local" / "privacy.json").is_file()
    assert not (prod / "site-2" / "local" / "privacy.json").exists()
    # The user's ~/.nvflare is left alone: the CLI's own records go into the consortium's workspace.
    assert (tmp_path / "ws" / "nvflare_home" / ".nvflare").is_dir()
    assert poc.stop().all_stopped  # nothing was started


def test_start_needs_prepare(tmp_path, sites):
    with pytest.raises(PocError, match="prepare"):
        PocConsortium(tmp_path / "ws", sites, tmp_path, "k").start()


def test_a_dead_party_is_named_with_its_log(tmp_path, sites):
    poc = PocConsortium(tmp_path / "ws", sites, tmp_path, "k")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    poc._processes.add("site-2", dead)
    with pytest.raises(PocError, match=r"site-2 exited \(code 3\) while testing; see .*site-2/log\.txt"):
        poc._raise_if_dead("while testing")
    report = poc.stop()
    assert report.all_stopped and not report.graceful  # no server to shut down through


def test_connected_sites_needs_a_running_consortium(tmp_path, sites):
    poc = PocConsortium(tmp_path / "ws", sites, tmp_path, "k")
    with pytest.raises(PocError, match="not running"):
        poc.connected_sites()
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    poc._processes.add("server", dead)
    with pytest.raises(PocError, match=r"server exited \(code 3\) before the connected sites were listed"):
        poc.connected_sites()
    assert poc.stop().all_stopped
