"""Rate-limited links between a server and its sites, each in a network namespace of its own (Linux, root).

One machine stands in for several: the server and every site live in separate network namespaces, joined by one
veth pair per site, and each end of a pair shapes its egress with a token bucket (``tc qdisc ... tbf``), so each
direction of each site's link carries at most the given rate, as a site's uplink to a data centre would::

    server namespace                                  site namespaces
    lo: 10.213.0.1/32 (the server's address)
    veth 10.213.1.1/30  <-- tbf rate R each way -->   veth 10.213.1.2/30 (site-1), route to 10.213.0.1 via .1.1
    veth 10.213.2.1/30  <-- tbf rate R each way -->   veth 10.213.2.2/30 (site-2), ...

Every address is in one private /30 per pair (plus the server's /32), inside namespaces only this harness created
and deletes: nothing is added to the machine's own namespace, and :func:`check_private_network` refuses a block
that the machine itself uses. Latency is **not** simulated (``netem`` is absent here): a packet waits only in the
token bucket's queue (at most ``latency_ms``), so these links are fast pipes of limited width.

:class:`NamespaceLinks` creates all of it on entry and removes it on exit, also after an error, Ctrl-C or SIGTERM:
it first kills the processes still running inside its namespaces (only those, by pid), then deletes the
namespaces, which removes their veth pairs and queues. Every command it runs is bounded by a timeout.
:func:`tcp_copy` measures what a plain TCP connection achieves over one link, the ceiling for anything above it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "NAMESPACE_PREFIX",
    "DEFAULT_NETWORK",
    "LinkPlan",
    "NamespaceLinks",
    "NetnsError",
    "parse_rate",
    "netns_unavailable_reason",
    "check_private_network",
    "tcp_copy",
]

# Every namespace this harness creates starts with it (`ip netns list | grep splitunet-` finds strays).
NAMESPACE_PREFIX = "splitunet-"
# A private block for the links: 10.213.0.1 is the server, 10.213.<i>.0/30 the i-th site's pair.
DEFAULT_NETWORK = "10.213.0.0/16"
SERVER = "server"
# tc's units (SI, as tc reads them): bit, kbit, mbit, gbit.
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
# The bucket holds 5 ms of traffic, but never less than a 64 KiB GSO packet of the veth (smaller buckets stall it).
_BURST_S = 0.005
_MIN_BURST_BYTES = 64 * 1024

Runner = Callable[..., subprocess.CompletedProcess]


class NetnsError(RuntimeError):
    """A namespace, link or queue could not be created, used or removed (the message names the command)."""


def parse_rate(text: str) -> int:
    """Bits per second of a tc rate such as ``"1gbit"``, ``"100mbit"`` or ``"500kbit"`` (SI units, as tc reads them).

    Raises:
        ValueError: not a positive number followed by bit, kbit, mbit or gbit.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"link rate {text!r}: expected a positive number and one of {list(_UNITS)}, e.g. '100mbit'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class LinkPlan:
    """Names, addresses and commands of one server's namespaces and its sites' shaped links; runs nothing.

    Attributes:
        sites: site names, in order (site ``i`` gets the ``i``-th /30, from 1).
        rate: each direction of each site's link, as tc writes it (``"1gbit"``, ``"100mbit"``).
        token: distinguishes this run's namespaces and interfaces from any other run's (6 hex digits).
        network: the private block the addresses come from (a /16 or larger).
        latency_ms: the longest a packet may wait in a token bucket's queue before it is dropped (tbf's
            ``latency``); it bounds the queue, it does not delay packets.
    """

    sites: tuple[str, ...]
    rate: str
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    network: str = DEFAULT_NETWORK
    latency_ms: int = 50

    def __post_init__(self):
        object.__setattr__(self, "sites", tuple(self.sites))
        if not self.sites or len(set(self.sites)) != len(self.sites) or SERVER in self.sites:
            raise ValueError(f"sites must be distinct, non-empty and not {SERVER!r}; got {list(self.sites)}")
        parse_rate(self.rate)
        if not re.fullmatch(r"[0-9a-f]{1,6}", self.token):
            raise ValueError(
                f"token must be 1-6 lower-case hex digits (it goes into interface names), got {self.token!r}"
            )
        block = ipaddress.ip_network(self.network)
        if block.version != 4 or not block.is_private or block.prefixlen > 16:
            raise ValueError(f"network must be a private IPv4 block of /16 or larger, got {self.network}")
        if len(self.sites) > 254:
            raise ValueError(f"at most 254 sites fit the plan's /30 pairs, got {len(self.sites)}")
        if self.latency_ms < 1:
            raise ValueError(f"latency_ms must be >= 1, got {self.latency_ms}")

    # -- names and addresses -------------------------------------------------------------------------------------

    @property
    def parties(self) -> list[str]:
        """``"server"`` first, then the sites."""
        return [SERVER, *self.sites]

    def namespace(self, party: str) -> str:
        """The network namespace of ``party`` (``"server"`` or a site)."""
        return f"{NAMESPACE_PREFIX}{self.token}-{self._index(party) if party != SERVER else SERVER}"

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the plan, server first."""
        return [self.namespace(party) for party in self.parties]

    def _index(self, site: str) -> int:
        if site not in self.sites:
            raise KeyError(f"unknown party {site!r}; parties: {self.parties}")
        return self.sites.index(site) + 1

    def _octets(self, index: int, host: int) -> str:
        base = ipaddress.ip_network(self.network).network_address
        return str(base + (index << 8) + host)

    @property
    def server_address(self) -> str:
        """The address the server listens on and every site connects to (on the server namespace's lo)."""
        return self._octets(0, 1)

    def address(self, party: str) -> str:
        """The server's address, or a site's own end of its pair."""
        return self.server_address if party == SERVER else self._octets(self._index(party), 2)

    def gateway(self, site: str) -> str:
        """The server namespace's end of ``site``'s pair (the site's route to the server)."""
        return self._octets(self._index(site), 1)

    def interfaces(self, site: str) -> tuple[str, str]:
        """``(server end, site end)`` of ``site``'s veth pair; at most 15 characters, as Linux requires."""
        index = self._index(site)
        return f"su{self.token}s{index}", f"su{self.token}c{index}"

    @property
    def rate_bits(self) -> int:
        """The rate in bits per second."""
        return parse_rate(self.rate)

    @property
    def burst_bytes(self) -> int:
        """Size of each token bucket: 5 ms at the rate, at least 64 KiB."""
        return max(int(self.rate_bits / 8 * _BURST_S), _MIN_BURST_BYTES)

    def exec_prefix(self, party: str) -> list[str]:
        """The command prefix that runs a program inside ``party``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(party)]

    # -- commands ------------------------------------------------------------------------------------------------

    def _shaping(self, namespace: str, device: str) -> list[str]:
        return [
            "tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf",
            "rate", self.rate, "burst", str(self.burst_bytes), "latency", f"{self.latency_ms}ms",
        ]  # fmt: skip

    def setup_commands(self) -> list[list[str]]:
        """Every command that builds the plan, in order: namespaces, pairs, addresses, routes, token buckets."""
        server_ns = self.namespace(SERVER)
        commands = [
            ["ip", "netns", "add", server_ns],
            ["ip", "-n", server_ns, "link", "set", "lo", "up"],
            ["ip", "-n", server_ns, "addr", "add", f"{self.server_address}/32", "dev", "lo"],
        ]
        for site in self.sites:
            site_ns = self.namespace(site)
            server_end, site_end = self.interfaces(site)
            commands += [
                ["ip", "netns", "add", site_ns],
                # Job processes reach their own party through 127.0.0.1 inside the namespace.
                ["ip", "-n", site_ns, "link", "set", "lo", "up"],
                # Both ends are born in their namespaces: nothing ever appears in the machine's own namespace.
                ["ip", "link", "add", server_end, "netns", server_ns, "type", "veth",
                 "peer", "name", site_end, "netns", site_ns],
                ["ip", "-n", server_ns, "addr", "add", f"{self.gateway(site)}/30", "dev", server_end],
                ["ip", "-n", site_ns, "addr", "add", f"{self.address(site)}/30", "dev", site_end],
                ["ip", "-n", server_ns, "link", "set", server_end, "up"],
                ["ip", "-n", site_ns, "link", "set", site_end, "up"],
                ["ip", "-n", site_ns, "route", "add", f"{self.server_address}/32", "via", self.gateway(site)],
                # Egress on each end: server -> site (gradients) and site -> server (activations).
                self._shaping(server_ns, server_end),
                self._shaping(site_ns, site_end),
            ]  # fmt: skip
        return commands

    def describe(self) -> dict:
        """Plain-JSON form for reports: rate, bucket, addresses, what is and is not simulated."""
        return {
            "rate": self.rate,
            "rate_bits_per_s": self.rate_bits,
            "burst_bytes": self.burst_bytes,
            "queue_latency_ms": self.latency_ms,
            "server_address": self.server_address,
            "site_addresses": {site: self.address(site) for site in self.sites},
            "shaping": "tc tbf on egress of both veth ends: each direction of each site's link",
            "latency": "not simulated (netem absent); packets wait only in the token bucket's queue",
        }


def _run(run: Runner, command: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        completed = run(list(command), capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as error:
        raise NetnsError(f"'{' '.join(command)}' did not finish within {timeout_s:.0f}s") from error
    except OSError as error:
        raise NetnsError(f"'{' '.join(command)}' could not run: {error}") from error
    if completed.returncode != 0:
        raise NetnsError(f"'{' '.join(command)}' failed (exit {completed.returncode}): {completed.stderr.strip()}")
    return completed


def netns_unavailable_reason(run: Runner = subprocess.run, timeout_s: float = 10.0) -> str | None:
    """Why namespaces with shaped links cannot be made here, or ``None`` when they can.

    Checks root (``CAP_NET_ADMIN``), ``ip`` and ``tc`` on the PATH, and that a probe namespace can be added and
    deleted (containers often forbid it).
    """
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return f"network namespaces need root (CAP_NET_ADMIN); running as uid {os.geteuid()}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not on the PATH"
    probe = f"{NAMESPACE_PREFIX}probe-{secrets.token_hex(3)}"
    try:
        _run(run, ["ip", "netns", "add", probe], timeout_s)
    except NetnsError as error:
        return f"'ip netns add' is not allowed here: {error}"
    try:
        _run(run, ["ip", "netns", "del", probe], timeout_s)
    except NetnsError as error:
        return f"'ip netns del' of the probe failed: {error}"
    return None


def check_private_network(network: str, run: Runner = subprocess.run, timeout_s: float = 10.0) -> None:
    """Refuse a block that the machine's own namespace has an address or route in (the links' must be theirs alone).

    Raises:
        NetnsError: naming the overlapping address or route.
    """
    block = ipaddress.ip_network(network)
    for command in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show"]):
        for line in _run(run, command, timeout_s).stdout.splitlines():
            for word in line.split():
                try:
                    used = ipaddress.ip_network(word, strict=False)
                except ValueError:
                    continue
                if used.version == 4 and used.overlaps(block) and used.prefixlen > 0:
                    raise NetnsError(
                        f"{network} overlaps {used} of this machine ('{line.strip()}'); pick another block"
                    )


class NamespaceLinks:
    """Creates a :class:`LinkPlan` on entry and removes everything of it on exit, whatever ended the block.

    Example::

        plan = LinkPlan(("site-1", "site-2"), "100mbit")
        with NamespaceLinks(plan) as links:
            subprocess.run([*plan.exec_prefix("site-1"), "python3", "client.py", plan.server_address])

    Args:
        plan: what to create.
        timeout_s: bound of each ``ip``/``tc`` command and of waiting for killed processes to go.
        run: ``subprocess.run`` (tests pass a fake).
        kill: ``os.kill`` (tests pass a fake).
    """

    def __init__(
        self,
        plan: LinkPlan,
        timeout_s: float = 20.0,
        run: Runner = subprocess.run,
        kill: Callable[[int, int], None] = os.kill,
    ):
        self.plan = plan
        self.timeout_s = float(timeout_s)
        self._run_command = run
        self._kill = kill
        self._created: list[str] = []
        self._previous_sigterm = None
        self.killed: list[int] = []

    def _run(self, command: Sequence[str]) -> subprocess.CompletedProcess:
        return _run(self._run_command, command, self.timeout_s)

    def create(self) -> NamespaceLinks:
        """Run the plan's commands; on any failure remove what was made, then raise.

        Raises:
            NetnsError: the command that failed and its error.
        """
        if self._created:
            raise NetnsError(f"namespaces {self._created} exist already; remove() first")
        check_private_network(self.plan.network, self._run_command, self.timeout_s)
        clashing = self.existing()
        if clashing:  # another run's (same token): never remove what this one did not make
            raise NetnsError(f"namespaces {clashing} exist already; use another token")
        try:
            for command in self.plan.setup_commands():
                if command[:3] == ["ip", "netns", "add"]:
                    self._created.append(command[3])  # before it runs: a half-made namespace is still removed
                self._run(command)
        except BaseException:
            self.remove()
            raise
        return self

    def pids(self, namespace: str) -> list[int]:
        """Processes running inside one of this plan's namespaces (``ip netns pids``)."""
        try:
            return [int(pid) for pid in self._run(["ip", "netns", "pids", namespace]).stdout.split()]
        except NetnsError:
            return []  # the namespace is gone (or was never made)

    def remove(self) -> list[str]:
        """Kill what runs inside the namespaces (SIGKILL, by pid), then delete them; safe to call twice.

        Returns:
            the errors met (removal goes on past each); empty when everything is gone.
        """
        errors = []
        for namespace in reversed(self._created):
            for pid in self.pids(namespace):
                try:
                    self._kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + self.timeout_s
            while self.pids(namespace) and time.monotonic() < deadline:
                time.sleep(0.1)
            try:
                self._run(["ip", "netns", "del", namespace])
            except NetnsError as error:
                if namespace in self.existing():
                    errors.append(str(error))
        left = [namespace for namespace in self._created if namespace in self.existing()]
        if left:
            errors.append(f"namespaces {left} are still there; remove them with 'ip netns del <name>'")
        self._created = left
        return errors

    def existing(self) -> list[str]:
        """Namespaces of this plan that exist now (``ip netns list``)."""
        try:
            listed = self._run(["ip", "netns", "list"]).stdout.split("\n")
        except NetnsError:
            return []
        names = {line.split()[0] for line in listed if line.strip()}
        return [namespace for namespace in self.plan.namespaces if namespace in names]

    def __enter__(self) -> NamespaceLinks:
        if threading.current_thread() is threading.main_thread():
            # A SIGTERM (e.g. a timeout's kill) unwinds through __exit__ like Ctrl-C, instead of leaving the links.
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            return self.create()
        except BaseException:
            self._restore_sigterm()
            raise

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            errors = self.remove()
        finally:
            self._restore_sigterm()
        if errors and exc_type is None:
            raise NetnsError("; ".join(errors))

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# The two ends of :func:`tcp_copy`, each run by a fresh interpreter inside its namespace (no splitunet import).
_RECEIVER = """
import json, socket, sys, time
host, total, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with socket.create_server((host, 0)) as server:
    server.settimeout(timeout)
    print("port", server.getsockname()[1], flush=True)
    connection, _ = server.accept()
    with connection:
        connection.settimeout(timeout)
        view, received, start = memoryview(bytearray(1 << 20)), 0, None
        while received < total:
            count = connection.recv_into(view)
            if not count:
                break
            start = start or time.perf_counter()
            received += count
        elapsed = time.perf_counter() - start
print(json.dumps({"bytes": received, "seconds": elapsed}), flush=True)
"""
_SENDER = """
import socket, sys
host, port, total, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
chunk = bytes(1 << 20)
with socket.create_connection((host, port), timeout=timeout) as sender:
    while total > 0:
        sender.sendall(chunk[: min(total, len(chunk))])
        total -= min(total, len(chunk))
"""


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        raise NetnsError(f"the TCP receiver printed nothing within {timeout_s:.0f}s")
    return process.stdout.readline().strip()


def tcp_copy(plan: LinkPlan, sender: str, receiver: str, num_bytes: int, timeout_s: float = 60.0) -> dict:
    """Send ``num_bytes`` over a plain TCP connection from ``sender``'s namespace to ``receiver``'s.

    The receiver times from its first byte to its last, so interpreter start-up and the handshake are left out;
    the bucket's first burst is included. Both ends are processes of this call, killed if they outlast
    ``timeout_s``.

    Returns:
        ``{"from", "to", "bytes", "seconds", "mb_per_s", "mbit_per_s"}`` (MB = 10^6 bytes).

    Raises:
        NetnsError: an end failed, timed out or the byte count differs.
    """
    if sender == receiver:
        raise ValueError(f"sender and receiver are both {sender!r}")
    host = plan.address(receiver)
    listen = subprocess.Popen(
        [*plan.exec_prefix(receiver), sys.executable, "-c", _RECEIVER, host, str(int(num_bytes)), str(timeout_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(listen, timeout_s)
        if not line.startswith("port "):
            listen.kill()
            _, errors = listen.communicate(timeout=5)
            raise NetnsError(f"the TCP receiver in {plan.namespace(receiver)} said {line!r}: {errors.strip()}")
        port = line.split()[1]
        command = [*plan.exec_prefix(sender), sys.executable, "-c", _SENDER, host, port, str(int(num_bytes))]
        _run(subprocess.run, [*command, str(timeout_s)], timeout_s)
        output, errors = listen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise NetnsError(f"the TCP copy {sender} -> {receiver} outlasted {timeout_s:.0f}s") from error
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait(timeout=5)
    if listen.returncode != 0:
        raise NetnsError(f"the TCP receiver failed (exit {listen.returncode}): {errors.strip()}")
    result = json.loads(output.strip().splitlines()[-1])
    if result["bytes"] != num_bytes:
        raise NetnsError(f"the TCP receiver got {result['bytes']} of {num_bytes} bytes")
    rate = result["bytes"] / result["seconds"]
    return {
        "from": sender,
        "to": receiver,
        "bytes": int(num_bytes),
        "seconds": result["seconds"],
        "mb_per_s": rate / 1e6,
        "mbit_per_s": rate * 8 / 1e6,
    }
