"""tools.netns_links: the commands a plan builds, cleanup on every way out (a fake ``ip``), and one real shaped link.

The unit tests run no ``ip`` or ``tc``: :class:`FakeIp` keeps the namespaces a real ``ip`` would have and fails
where told to. The one ``e2e`` test builds two real namespaces joined by a 20 Mbit/s link (root only).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time

import pytest

from splitunet.tools.netns_links import (
    NAMESPACE_PREFIX,
    LinkPlan,
    NamespaceLinks,
    NetnsError,
    netns_unavailable_reason,
    parse_rate,
    tcp_copy,
)

SITES = ("site-1", "site-2", "site-3")


class FakeIp:
    """Stands in for ``subprocess.run`` of ``ip``/``tc``: records each command and tracks namespaces.

    Args:
        fail_on: a command whose first words are these fails (exit 2).
        pids: namespace -> pids ``ip netns pids`` reports until they are killed.
        host_addresses: what ``ip -4 -o addr show`` prints for the machine's own namespace.
    """

    def __init__(self, fail_on=None, pids=None, host_addresses="1: lo    inet 127.0.0.1/8 scope host lo"):
        self.fail_on = fail_on
        self.pids = dict(pids or {})
        self.host_addresses = host_addresses
        self.namespaces: set[str] = set()
        self.commands: list[list[str]] = []
        self.killed: list[tuple[int, int]] = []

    def __call__(self, command, **kwargs):
        assert kwargs.get("timeout"), "every command must be bounded"
        self.commands.append(command)
        if self.fail_on and command[: len(self.fail_on)] == self.fail_on:
            return subprocess.CompletedProcess(command, 2, "", "RTNETLINK answers: Operation not permitted")
        output = ""
        if command[:3] == ["ip", "netns", "add"]:
            self.namespaces.add(command[3])
        elif command[:3] == ["ip", "netns", "del"]:
            if command[3] not in self.namespaces:
                return subprocess.CompletedProcess(command, 1, "", "No such file or directory")
            self.namespaces.discard(command[3])
        elif command[:3] == ["ip", "netns", "list"]:
            output = "\n".join(f"{name} (id: {index})" for index, name in enumerate(sorted(self.namespaces)))
        elif command[:3] == ["ip", "netns", "pids"]:
            if command[3] not in self.namespaces:
                return subprocess.CompletedProcess(command, 1, "", "No such file or directory")
            output = "\n".join(str(pid) for pid in self.pids.get(command[3], []))
        elif command[:4] == ["ip", "-4", "-o", "addr"]:
            output = self.host_addresses
        return subprocess.CompletedProcess(command, 0, output, "")

    def kill(self, pid, signum):
        self.killed.append((pid, signum))
        for pids in self.pids.values():
            if pid in pids:
                pids.remove(pid)


def _plan(**kwargs) -> LinkPlan:
    return LinkPlan(SITES, kwargs.pop("rate", "100mbit"), token=kwargs.pop("token", "ab12cd"), **kwargs)


@pytest.mark.parametrize(
    "text, bits",
    [("1gbit", 10**9), ("100mbit", 10**8), ("20mbit", 2 * 10**7), ("500kbit", 5 * 10**5), ("1.5Mbit", 15 * 10**5)],
)
def test_rates_read_as_tc_reads_them(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "0mbit", "100mb", "-1gbit", ""])
def test_bad_rates_are_refused(text):
    with pytest.raises(ValueError, match="link rate"):
        parse_rate(text)


def test_addresses_are_private_one_slash30_per_site_and_names_fit_linux():
    plan = _plan()
    assert plan.server_address == "10.213.0.1"
    pairs = []
    for index, site in enumerate(SITES, start=1):
        pair = ipaddress.ip_network(f"{plan.gateway(site)}/30", strict=False)
        assert pair == ipaddress.ip_network(f"10.213.{index}.0/30")
        assert ipaddress.ip_address(plan.address(site)) in pair and pair.is_private
        assert plan.server_address not in {str(host) for host in pair}
        pairs.append(pair)
        assert all(len(name) <= 15 for name in plan.interfaces(site))  # IFNAMSIZ - 1
    assert len(set(pairs)) == len(SITES)
    assert len(set(plan.namespaces)) == len(SITES) + 1
    assert all(name.startswith(f"{NAMESPACE_PREFIX}ab12cd-") for name in plan.namespaces)
    assert plan.exec_prefix("site-2") == ["ip", "netns", "exec", plan.namespace("site-2")]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"token": "NOT-HEX"}, "token"),
        ({"network": "8.8.0.0/16"}, "private"),
        ({"network": "10.213.0.0/24"}, "/16"),
        ({"rate": "quick"}, "link rate"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _plan(**kwargs)
    with pytest.raises(ValueError, match="server"):
        LinkPlan(("server",), "1gbit")


def test_every_site_link_is_shaped_both_ways_and_routes_to_the_server():
    plan = _plan(rate="1gbit")
    commands = plan.setup_commands()
    # Nothing is configured in the machine's own namespace: every address, route and queue names a namespace,
    # and both ends of each pair are born in theirs.
    for command in commands:
        if command[:3] == ["ip", "link", "add"]:
            assert command.count("netns") == 2
        elif command[:3] != ["ip", "netns", "add"]:
            assert command[1] == "-n" and command[2] in plan.namespaces, command
    for site in SITES:
        server_end, site_end = plan.interfaces(site)
        site_ns, server_ns = plan.namespace(site), plan.namespace("server")
        veth = ["ip", "link", "add", server_end, "netns", server_ns, "type", "veth", "peer", "name", site_end]
        assert [*veth, "netns", site_ns] in commands
        for namespace, device in ((server_ns, server_end), (site_ns, site_end)):
            [shaping] = [c for c in commands if c[:3] == ["tc", "-n", namespace] and device in c]
            rate, burst = shaping[shaping.index("rate") + 1], int(shaping[shaping.index("burst") + 1])
            assert "tbf" in shaping and rate == "1gbit"
            assert burst >= 1e9 / 8 / 1000  # at least one 1 ms tick of traffic, or tbf cannot reach the rate
        route = ["ip", "-n", site_ns, "route", "add", f"{plan.server_address}/32", "via", plan.gateway(site)]
        assert route in commands
        assert ["ip", "-n", site_ns, "link", "set", "lo", "up"] in commands  # job processes talk over lo
    assert ["ip", "-n", plan.namespace("server"), "addr", "add", "10.213.0.1/32", "dev", "lo"] in commands


def test_links_are_made_on_entry_and_removed_on_exit():
    fake = FakeIp()
    plan = _plan()
    with NamespaceLinks(plan, run=fake, kill=fake.kill) as links:
        assert sorted(links.existing()) == sorted(plan.namespaces)
        built = [c for c in fake.commands if c[:2] != ["ip", "-4"] and c[:3] not in (["ip", "netns", "list"],)]
        assert built == plan.setup_commands()
    assert fake.namespaces == set()


def test_a_failed_command_removes_what_was_made_and_names_itself():
    fake = FakeIp(fail_on=["tc"])
    plan = _plan()
    with pytest.raises(NetnsError, match=r"'tc -n .* tbf .*' failed \(exit 2\): RTNETLINK"):
        with NamespaceLinks(plan, run=fake, kill=fake.kill):
            pytest.fail("the block must not run when the links could not be made")
    assert fake.namespaces == set()
    deleted = [c[3] for c in fake.commands if c[:3] == ["ip", "netns", "del"]]
    assert sorted(deleted) == sorted([plan.namespace("server"), plan.namespace("site-1")])


def test_an_interrupt_kills_only_the_processes_inside_and_removes_everything():
    plan = _plan()
    fake = FakeIp(pids={plan.namespace("site-2"): [4242, 4243]})
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with NamespaceLinks(plan, run=fake, kill=fake.kill) as links:
            fake.namespaces.add("someone-elses")  # not ours: must survive
            raise KeyboardInterrupt
    assert fake.killed == [(4242, signal.SIGKILL), (4243, signal.SIGKILL)] and links.killed == [4242, 4243]
    assert fake.namespaces == {"someone-elses"}
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_unwinds_through_the_cleanup():
    fake = FakeIp()
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal"):
        with NamespaceLinks(_plan(), run=fake, kill=fake.kill):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises within this sleep
            pytest.fail("SIGTERM did not interrupt the block")
    assert fake.namespaces == set()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_block_the_machine_uses_is_refused_before_anything_is_made():
    fake = FakeIp(host_addresses="2: eth0    inet 10.213.7.9/24 brd 10.213.7.255 scope global eth0")
    with pytest.raises(NetnsError, match=r"10\.213\.0\.0/16 overlaps 10\.213\.7\.0/24"):
        NamespaceLinks(_plan(), run=fake, kill=fake.kill).create()
    assert not [c for c in fake.commands if c[:3] == ["ip", "netns", "add"]]


def test_existing_namespaces_of_the_same_token_are_left_alone():
    plan = _plan()
    fake = FakeIp()
    fake.namespaces.add(plan.namespace("site-1"))
    with pytest.raises(NetnsError, match="exist already"):
        NamespaceLinks(plan, run=fake, kill=fake.kill).create()
    assert fake.namespaces == {plan.namespace("site-1")}


def test_unavailable_reasons_name_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in netns_unavailable_reason(FakeIp())
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/sbin/{tool}")
    reason = netns_unavailable_reason(FakeIp(fail_on=["ip", "netns", "add"]))
    assert reason.startswith("'ip netns add' is not allowed here") and "Operation not permitted" in reason
    fake = FakeIp()
    assert netns_unavailable_reason(fake) is None and fake.namespaces == set()  # the probe is removed again


_UNAVAILABLE = netns_unavailable_reason()


@pytest.mark.e2e
@pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"network namespaces unavailable: {_UNAVAILABLE}")
def test_a_real_shaped_link_carries_its_rate_both_ways_and_leaves_nothing():
    """Two real namespaces, a veth pair shaped to 20 Mbit/s on both ends, 3 MB each way over plain TCP (~3 s)."""
    plan = LinkPlan(("site-1",), "20mbit")
    with NamespaceLinks(plan) as links:
        assert sorted(links.existing()) == sorted(plan.namespaces)
        copies = [tcp_copy(plan, "site-1", "server", 3_000_000), tcp_copy(plan, "server", "site-1", 3_000_000)]
    for copy in copies:
        assert 0.75 * 20 <= copy["mbit_per_s"] <= 1.25 * 20, copy
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert plan.token not in listed
    interfaces = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    assert f"su{plan.token}" not in interfaces
