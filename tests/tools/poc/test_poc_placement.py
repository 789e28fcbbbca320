"""poc: a consortium placed off loopback (the benchmark's namespaces): its kits carry the host, parties their prefix."""

from __future__ import annotations

import json

import pytest

from splitunet.tools.poc import ADMIN_USER, PocConsortium, PocError
from splitunet.tools.poc.processes import CONSOLE_LOG, launch_party

# Another loopback address than FLARE's usual one: bindable here without any namespace.
_HOST = "127.0.0.2"


def test_kits_carry_the_given_host_for_server_sites_and_admin(tmp_path, monkeypatch, sites):
    """Runs the real ``nvflare poc prepare`` (about a second; nothing is started)."""
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    poc = PocConsortium(tmp_path / "ws", sites, tmp_path / "parties", "k", host=_HOST)
    prod = poc.prepare()
    address = f"{_HOST}:{poc.port}"
    assert (
        json.loads((prod / "server" / "startup" / "fed_server.json").read_text())["servers"][0]["service"]["target"]
        == address
    )
    for site in sites:
        client = json.loads((prod / site / "startup" / "fed_client.json").read_text())
        assert client["servers"][0]["service"]["target"] == address
    admin = json.loads((prod / ADMIN_USER / "startup" / "fed_admin.json").read_text())["admin"]
    assert (admin["host"], admin["port"]) == (_HOST, poc.port)
    assert poc.stop().all_stopped


def test_prefixes_for_unknown_parties_are_refused(tmp_path, sites):
    with pytest.raises(PocError, match=r"party_prefixes given for unknown parties \['site-9'\]"):
        PocConsortium(tmp_path / "ws", sites, tmp_path, "k", party_prefixes={"site-9": ["true"]})


def test_a_party_starts_under_its_prefix_as_the_same_process(tmp_path):
    startup = tmp_path / "site-1" / "startup"
    startup.mkdir(parents=True)
    (startup / "sub_start.sh").write_text('echo "placed=$PLACED pid=$$"\n')
    process = launch_party(tmp_path / "site-1", {"PATH": "/usr/bin:/bin"}, prefix=["env", "PLACED=inside"])
    assert process.wait(timeout=30) == 0
    console = (tmp_path / "site-1" / CONSOLE_LOG).read_text()
    # `env` execs the command in place, as `ip netns exec` does: the pid held is the party's own.
    assert f"placed=inside pid={process.pid}" in console
