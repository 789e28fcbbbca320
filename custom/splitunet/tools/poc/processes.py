"""The processes of a POC consortium: each party's own process and the job processes FLARE starts for it.

FLARE starts a job's processes in sessions of their own (``setsid``): once their party's process is gone they are
reparented and no longer found as its children. :class:`PartyProcesses` therefore remembers them while their
parents are alive, and finds the rest by the kits folder on their command line, so that nothing outlives
:meth:`PartyProcesses.kill_all`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from splitunet.compute.devices import THREADS_ENV_VAR
from splitunet.data.party_settings import SETTINGS_ENV_VAR

__all__ = ["CONSOLE_LOG", "FLARE_LOG", "PartyProcesses", "launch_party", "party_environment", "party_log_files"]

# Same name as `nvflare poc start` uses, so by-hand runs and harness runs leave their output in the same place.
CONSOLE_LOG = "poc_console.log"
# FLARE's own log of a party's parent process, in the party's workspace folder.
FLARE_LOG = "log.txt"


def party_log_files(party_dir: Path) -> list[Path]:
    """FLARE's log of a party and the console output of its process (what to read when it fails)."""
    return [party_dir / FLARE_LOG, party_dir / CONSOLE_LOG]


def party_environment(threads: int, extra: Mapping[str, str]) -> dict[str, str]:
    """Environment of a party's processes: this interpreter, ``threads`` torch threads, then ``extra`` on top."""
    env = dict(os.environ)
    # Each party must read its own local/ settings; a global override would give every party the same file.
    env.pop(SETTINGS_ENV_VAR, None)
    # The kits' scripts call `python3`; it must be this interpreter, where splitunet is installed.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[THREADS_ENV_VAR] = str(threads)
    env.update(extra)
    return env


def launch_party(party_dir: Path, env: Mapping[str, str], prefix: Sequence[str] = ()) -> subprocess.Popen:
    """Start a party from its startup kit in ``party_dir``, its output appended to the party's console log.

    ``prefix`` goes before the command, e.g. ``ip netns exec <namespace>``, which execs it in place (same pid).
    """
    startup = party_dir / "startup"
    console = open(party_dir / CONSOLE_LOG, "a", buffering=1, encoding="utf-8")
    console.write(f"\n--- splitunet.tools.poc start {time.asctime()} ---\n")
    try:
        # `sub_start.sh --once` execs the party's Python directly: no restart loop that would hide a crash
        # behind restarts, no 5 s start delay, and the pid we hold is the party's own process. Its own
        # session (process group) lets kill_all() signal the party and whatever it started in one call.
        return subprocess.Popen(
            [*prefix, "bash", str(startup / "sub_start.sh"), "--once"],
            cwd=party_dir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        console.close()  # the child holds its own descriptor


def _is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _process_or_none(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


class PartyProcesses:
    """The party processes of one consortium, the job processes they started, and strays of its kits.

    Args:
        kits_dir: the consortium's startup kits; a process whose command line names this folder belongs to the
            consortium even if it was never seen as a party's child.
    """

    def __init__(self, kits_dir: Path):
        self.kits_dir = Path(kits_dir)
        self._parties: dict[str, subprocess.Popen] = {}
        # Job processes FLARE spawns in their own sessions (setsid): remembered while their parents are alive,
        # because once a parent is gone they are reparented and no longer found as its children.
        self._descendants: dict[int, tuple[str, psutil.Process]] = {}

    @property
    def started(self) -> bool:
        """True when a party was added since the last :meth:`clear`."""
        return bool(self._parties)

    def add(self, party: str, process: subprocess.Popen) -> None:
        """Track ``process`` as the party's own process."""
        self._parties[party] = process

    def get(self, party: str) -> subprocess.Popen | None:
        """The party's own process, if it was added."""
        return self._parties.get(party)

    def any_running(self) -> bool:
        """True while at least one party's own process has not exited."""
        return any(process.poll() is None for process in self._parties.values())

    def poll(self) -> tuple[str, int] | None:
        """Remember the job processes started so far and return ``(party, exit code)`` of the first that exited."""
        self.remember_descendants()
        for party, process in self._parties.items():
            code = process.poll()
            if code is not None:
                return party, code
        return None

    def remember_descendants(self) -> None:
        """Note every current descendant of a party, so that it is still found after being reparented."""
        for party, process in self._parties.items():
            try:
                children = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                self._descendants.setdefault(child.pid, (f"{party} job process", child))

    def _kit_processes(self) -> list[tuple[str, psutil.Process]]:
        """Processes started from the kits, found by their command line naming ``kits_dir``.

        Catches job processes that were reparented before they could be remembered.
        """
        marker, found = str(self.kits_dir), []
        for process in psutil.process_iter(["cmdline"]):  # process_iter skips processes that vanish meanwhile
            cmdline = process.info.get("cmdline") or []
            if process.pid != os.getpid() and any(marker in part for part in cmdline) and _is_alive(process):
                found.append((f"process of {marker}", process))
        return found

    def _alive_by_pid(self) -> dict[int, tuple[str, psutil.Process]]:
        """pid -> (name for reports, process) of every live process known or found, parties first."""
        alive: dict[int, tuple[str, psutil.Process]] = {}
        for party, process in self._parties.items():
            found = _process_or_none(process.pid) if process.poll() is None else None
            if found is not None:
                alive[process.pid] = (party, found)
        for name, process in [*self._descendants.values(), *self._kit_processes()]:
            if _is_alive(process):
                alive.setdefault(process.pid, (name, process))
        return alive

    def alive(self) -> list[psutil.Process]:
        """Every live process of the consortium: the parties, their job processes and strays found by path."""
        self.remember_descendants()
        return [process for _, process in self._alive_by_pid().values()]

    def listening_addresses(self) -> set[tuple[str, int]]:
        """``(ip, port)`` of every TCP socket the consortium's processes listen on."""
        addresses = set()
        for process in self.alive():
            try:
                connections = process.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            addresses |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
        return addresses

    def wait_for_exit(self, first: str, deadline: float, others_grace_s: float) -> list[str]:
        """Wait for party ``first`` until ``deadline``, then for every other party at most ``others_grace_s`` more.

        Returns:
            the parties that did not exit in time.
        """
        late = []
        for party in [first, *[party for party in self._parties if party != first]]:
            if party != first:
                deadline = min(deadline, time.monotonic() + others_grace_s)
            try:
                self._parties[party].wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                late.append(party)
            self.remember_descendants()  # job processes of parties still alive
        return late

    def kill_party(self, party: str, grace_s: float = 5.0) -> tuple[list[str], list[int]]:
        """SIGKILL one party's own process and its job processes at once, as a crash or power cut would.

        No SIGTERM first: a party that is asked to stop logs out of the server, which a site whose machine or
        connection is lost never does. The party is forgotten afterwards, so :meth:`poll` does not report it.

        Returns:
            ``"<party or job process> pid=<pid>"`` for each process killed, and the pids still alive after
            ``grace_s`` (should stay empty).

        Raises:
            KeyError: ``party`` was never added.
        """
        own = self._parties[party]
        self.remember_descendants()
        victims: dict[int, tuple[str, psutil.Process]] = {}
        found = _process_or_none(own.pid) if own.poll() is None else None
        if found is not None:
            victims[own.pid] = (party, found)
        victims.update({pid: entry for pid, entry in self._descendants.items() if entry[0].startswith(f"{party} ")})
        # Job processes reparented before they were remembered: their command line names the party's kit folder.
        kit = str(self.kits_dir / party)
        for name, process in self._kit_processes():
            try:
                cmdline = process.cmdline()
            except psutil.NoSuchProcess:
                continue
            if any(part == kit or part.startswith(kit + os.sep) for part in cmdline):
                victims.setdefault(process.pid, (name, process))
        killed = []
        for pid, (name, process) in victims.items():
            try:
                process.kill()
                killed.append(f"{name} pid={pid}")
            except psutil.NoSuchProcess:
                pass
        try:
            own.wait(timeout=grace_s)  # reap, so the pid is not left as a zombie of this process
        except subprocess.TimeoutExpired:
            pass
        _, still_alive = psutil.wait_procs([process for _, process in victims.values()], timeout=grace_s)
        del self._parties[party]
        for pid in [pid for pid, _ in victims.items() if pid in self._descendants]:
            del self._descendants[pid]
        return killed, sorted(process.pid for process in still_alive)

    def kill_all(self, grace_s: float = 5.0) -> tuple[list[str], list[int]]:
        """SIGTERM every remaining process of the consortium, then SIGKILL what outlives ``grace_s``.

        Returns:
            ``"<party or job process> pid=<pid>"`` for each process signalled, and the pids still alive after
            killing (should stay empty).
        """
        leftovers = self._alive_by_pid()
        killed = []
        for pid, (name, process) in leftovers.items():
            try:
                process.terminate()
                killed.append(f"{name} pid={pid}")
            except psutil.NoSuchProcess:
                pass
        _, stubborn = psutil.wait_procs([process for _, process in leftovers.values()], timeout=grace_s)
        for process in stubborn:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        # A party's process group may also hold helpers it started without a session of their own.
        for process in self._parties.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(timeout=grace_s)  # reap, so the pid is not left as a zombie of this process
            except subprocess.TimeoutExpired:
                pass
        _, still_alive = psutil.wait_procs(stubborn, timeout=grace_s)
        strays = {process.pid for _, process in self._kit_processes()}
        return killed, sorted({process.pid for process in still_alive} | strays)

    def clear(self) -> None:
        """Forget every party and job process (after :meth:`kill_all`)."""
        self._parties.clear()
        self._descendants.clear()
