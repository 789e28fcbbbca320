"""poc.consortium: argument checks, the real ``nvflare poc prepare``, naming a dead party and killing one (no FLARE
started)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
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


def _party_with_job_process(kit: str) -> subprocess.Popen:
    """A stand-in party: it starts a 'job process' in a session of its own whose command line names its kit."""
    party = (
        "import subprocess, sys, time\n"
        f"job = [sys.executable, '-c', 'import time; time.sleep(60)', {kit!r}]\n"
        "subprocess.Popen(job, start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    return subprocess.Popen([sys.executable, "-c", party], start_new_session=True)


def _job_processes_of(poc, kit: str, count: int, timeout_s: float = 10.0) -> list:
    deadline = time.monotonic() + timeout_s
    found = []
    while time.monotonic() < deadline and len(found) < count:
        found = [process for process in poc.processes() if kit in process.cmdline()]
        time.sleep(0.1)
    return found


def test_kill_party_kills_its_process_and_job_processes_only(tmp_path, sites):
    poc = PocConsortium(tmp_path / "ws", sites, tmp_path, "k")
    lost, kept = (str(poc.prod_dir / site) for site in ("site-1", "site-2"))
    poc._processes.add("site-1", _party_with_job_process(lost))
    poc._processes.add("site-2", _party_with_job_process(kept))
    try:
        [lost_job] = _job_processes_of(poc, lost, 1)
        [kept_job] = _job_processes_of(poc, kept, 1)
        killed = poc.kill_party("site-1")
        assert len(killed) == 2 and any(f"pid={lost_job.pid}" in name for name in killed)
        assert not lost_job.is_running() or lost_job.status() == psutil.STATUS_ZOMBIE
        assert kept_job.is_running()
        poc._raise_if_dead("after the kill")  # the killed party is forgotten, not reported as dead
        with pytest.raises(PocError, match="not running"):
            poc.kill_party("site-1")
        with pytest.raises(PocError, match="unknown party"):
            poc.kill_party("site-9")
    finally:
        assert poc.stop().all_stopped


def test_prepare_sets_the_servers_heart_beat_timeout(tmp_path, monkeypatch, sites):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    with pytest.raises(PocError, match="heart_beat_timeout_s"):
        PocConsortium(tmp_path / "ws", sites, tmp_path / "parties", "k", heart_beat_timeout_s=0)
    poc = PocConsortium(tmp_path / "ws", sites, tmp_path / "parties", "k", heart_beat_timeout_s=30)
    server = poc.prepare() / "server"
    for config in (server / "startup" / "fed_server.json", server / "local" / "resources.json"):
        assert [entry["heart_beat_timeout"] for entry in json.loads(config.read_text())["servers"]] == [30.0]
    assert poc.stop().all_stopped
