"""POC mode: a real FLARE server and one real process per site on this machine, reachable on loopback only.

FLARE's proof-of-concept mode provisions a full consortium (mTLS certificates, one startup kit per party, an
admin kit) and runs every party as its own process, as a real deployment would. :class:`PocConsortium` drives it
for tests and by-hand trials::

    with PocConsortium(tmp / "poc_ws", {"site-1": "flair", "site-2": "t1"}, parties_dir, secret) as poc:
        poc.prepare()   # nvflare poc prepare, then each party's local/ (its own settings entry only)
        poc.start()     # server and sites, waits until every site is connected
        job_id = poc.submit("jobs/split_unet")
        status = poc.wait(job_id, timeout_s=600)
        results = poc.run_dir(job_id, "server") / "results.json"
    # leaving the block shuts everything down, also after an error

Every party gets what a real institution would hold in its ``local/`` folder: its own entry of the settings file
(never the other parties' data paths), the class allow-list entry for the installed ``splitunet`` package (the
job carries no code), and optionally its ``privacy.json``. The server listens on one free port on 127.0.0.1, so
nothing is exposed beyond this machine and a running FLARE on the default ports 8002/8003 is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
import yaml

from splitunet.checkpoint import write_json_atomic
from splitunet.deployment import allow_splitunet_classes
from splitunet.devices import THREADS_ENV_VAR
from splitunet.errors import SplitUNetConfigError
from splitunet.party_settings import SERVER_PARTY, SETTINGS_ENV_VAR, SETTINGS_FILE_NAME, write_settings
from splitunet.protocol import LABELS_PARTY, MODALITIES

__all__ = [
    "ADMIN_USER",
    "LOOPBACK_HOST",
    "PROJECT_NAME",
    "PocError",
    "PocTimeouts",
    "PocStopReport",
    "PocConsortium",
    "find_free_port",
    "poc_project_config",
    "pin_kits_to_loopback",
    "party_settings_entry",
    "write_party_local",
]

T = TypeVar("T")

LOOPBACK_HOST = "127.0.0.1"
PROJECT_NAME = "splitunet_poc"
# FLARE names the POC server "server"; the settings file keys the label holder the same way.
SERVER_NAME = SERVER_PARTY
# The project admin of FLARE's POC project: the only user allowed to submit jobs and shut the system down.
ADMIN_USER = "admin@nvidia.com"
# Same name as `nvflare poc start` uses, so by-hand runs and harness runs leave their output in the same place.
CONSOLE_LOG = "poc_console.log"
# FLARE's own log of a party's parent process, in the party's workspace folder.
FLARE_LOG = "log.txt"
# Job statuses FLARE reports once a job can no longer change (see flare_api._is_terminal_job_status).
_TERMINAL_PREFIX = "FINISHED"
_TERMINAL_LEGACY = {"ABORTED", "ABANDONED", "FAILED"}
# Seconds a site may take to exit after the server has: enough to finish a shutdown it received.
_SITE_EXIT_GRACE_S = 10.0


class PocError(SplitUNetConfigError):
    """The POC consortium could not be prepared, started, run or stopped; the message names party and log file."""


@dataclass(frozen=True)
class PocTimeouts:
    """Upper bounds, in seconds, for each step; every wait in this module ends by one of these.

    Attributes:
        prepare_s: ``nvflare poc prepare`` (provisioning: certificates and startup kits).
        start_s: from starting the processes until every site is connected to the server.
        admin_call_s: one admin command (connect, submit, status, download).
        stop_s: graceful shutdown through the admin API until every process has exited; then they are killed.
        poll_s: pause between two status checks.
    """

    prepare_s: float = 120.0
    start_s: float = 120.0
    admin_call_s: float = 60.0
    stop_s: float = 60.0
    poll_s: float = 1.0

    def __post_init__(self):
        for name in ("prepare_s", "start_s", "admin_call_s", "stop_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise PocError(f"PocTimeouts.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class PocStopReport:
    """What :meth:`PocConsortium.stop` did.

    Attributes:
        graceful: the admin shutdown was accepted and every party exited by itself within the bound.
        killed: ``"<party or job process> pid=<pid>"`` for each process that had to be killed.
        survivors: pids still alive after killing (should stay empty).
        errors: problems met on the way (e.g. the admin shutdown failed); stopping went on regardless.
    """

    graceful: bool = False
    killed: list[str] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def all_stopped(self) -> bool:
        """True when no process of the consortium is alive any more."""
        return not self.survivors


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: the project file, kit edits and local settings (unit-tested without starting FLARE)
# ---------------------------------------------------------------------------------------------------------------


def find_free_port(host: str = LOOPBACK_HOST) -> int:
    """A TCP port that is free on ``host`` now (the OS picks it, so it never collides with a listening service).

    Another process could take it before FLARE binds it; :meth:`PocConsortium.start` then reports the server's
    bind error with its log, and a new ``prepare()`` picks another port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def poc_project_config(sites: Iterable[str], port: int, project_name: str = PROJECT_NAME) -> dict:
    """FLARE's POC ``project.yml`` content for these sites, with the server on ``port`` for FL and admin traffic.

    The builders are taken from the installed FLARE's own template, so the kits match the installed version.
    FLARE 2.9 serves FL and admin connections on one port unless ``admin_port`` differs; one port is one less
    to find free.
    """
    import nvflare.lighter as lighter
    from nvflare.lighter.utils import load_yaml

    template = load_yaml(str(Path(lighter.__file__).parent / "dummy_project.yml"))
    sites = list(sites)
    participants = [
        {"name": SERVER_NAME, "type": "server", "org": "nvidia", "fed_learn_port": int(port), "admin_port": int(port)},
        {"name": ADMIN_USER, "type": "admin", "org": "nvidia", "role": "project_admin"},
    ]
    participants += [{"name": site, "type": "client", "org": "nvidia"} for site in sites]
    return {
        "api_version": template["api_version"],
        "name": project_name,
        "description": "Split-U-Net POC consortium on loopback (generated by splitunet.poc)",
        "participants": participants,
        "builders": template["builders"],
    }


def _rewrite_json(path: Path, edit: Callable[[dict], None]) -> Path:
    if not path.is_file():
        raise PocError(f"startup kit file {path} is missing; did 'nvflare poc prepare' succeed?")
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def pin_kits_to_loopback(prod_dir: Path, sites: Iterable[str], port: int, host: str = LOOPBACK_HOST) -> list[Path]:
    """Point every startup kit at ``host:port``, so the server binds and the parties connect on loopback only.

    FLARE's provisioner writes the server target as ``<server name>:<port>``, which the server binds on all
    interfaces; a loopback host makes it bind (and advertise its internal listener) on loopback instead
    (``FederatedServer.deploy`` in 2.9). Clients and the admin kit get the literal address, not ``localhost``,
    which may resolve to ``::1`` where nothing listens. Plain POC kits carry no ``signature.json``, so editing the
    startup files is allowed.

    Returns:
        the files rewritten.
    """
    address = f"{host}:{int(port)}"

    def server(config: dict) -> None:
        for entry in config["servers"]:
            entry["service"]["target"] = address
            entry["admin_port"] = int(port)

    def client(config: dict) -> None:
        for entry in config["servers"]:
            entry["service"]["target"] = address

    def admin(config: dict) -> None:
        config["admin"]["host"] = host
        config["admin"]["port"] = int(port)

    edited = [_rewrite_json(prod_dir / SERVER_NAME / "startup" / "fed_server.json", server)]
    edited += [_rewrite_json(prod_dir / site / "startup" / "fed_client.json", client) for site in sites]
    edited.append(_rewrite_json(prod_dir / ADMIN_USER / "startup" / "fed_admin.json", admin))
    return edited


def party_settings_entry(party: str, site_modalities: Mapping[str, str], partition_dir: Path, layout: str) -> dict:
    """One party's entry of the settings file: a site's modality and folder, or the server's labels and layout."""
    partition_dir = Path(partition_dir).resolve()
    if party == SERVER_NAME:
        return {"labels_dir": str(partition_dir / LABELS_PARTY), "layout": layout}
    modality = site_modalities[party]
    return {"modality": modality, "data_dir": str(partition_dir / modality)}


def write_party_local(
    local_dir: Path, party: str, entry: Mapping, case_key_secret: str, privacy: Mapping | None = None
) -> list[Path]:
    """Write what a party's administrator keeps in its ``local/`` folder: settings, allow-list, privacy policy.

    The settings file holds only this party's entry, as a real institution's would.

    Returns:
        the files written.
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    written = [write_settings(local_dir / SETTINGS_FILE_NAME, {party: dict(entry)}, case_key_secret)]
    written.append(allow_splitunet_classes(local_dir))
    if privacy is not None:
        written.append(write_json_atomic(dict(privacy), local_dir / "privacy.json"))
    return written


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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} is not readable)"
    return "\n".join(text[-lines:])


def _is_terminal(status: str | None) -> bool:
    return isinstance(status, str) and (status.startswith(_TERMINAL_PREFIX) or status in _TERMINAL_LEGACY)


def _call_bounded(function: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``function`` in a helper thread and give up after ``timeout_s``.

    FLARE's admin client has no overall deadline for a command (a connect can retry, an upload can stall), so the
    deadline is kept here. A call that times out is abandoned in its daemon thread.
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"poc-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise PocError(f"{what} did not finish within {timeout_s:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ---------------------------------------------------------------------------------------------------------------
# The consortium
# ---------------------------------------------------------------------------------------------------------------


class PocConsortium:
    """A FLARE POC consortium on this machine: one server (labels, decoder) and one process per modality site.

    Args:
        workspace: folder for everything this consortium writes (created; a previous POC in it is replaced).
            The POC workspace is ``<workspace>/poc``; ``nvflare`` CLI settings go to ``<workspace>/nvflare_home``
            so that the user's ``~/.nvflare`` (active startup kit, POC location) is not changed.
        site_modalities: site name -> modality, e.g. ``{"site-1": "flair", "site-2": "t1"}``.
        partition_dir: folder as ``splitunet partition`` writes it (``<dir>/<modality>``, ``<dir>/labels``).
        case_key_secret: the data holders' shared secret for case keys; written into each party's settings.
        privacy_policies: site name -> content of that site's ``local/privacy.json`` (sites not named get none).
        server_privacy: content of the server's ``local/privacy.json``, if any.
        layout: label layout of the server's labels (``msd``, ``brats2021``, ...).
        timeouts: bounds of each step.
        threads_per_party: torch threads per party (``$SPLITUNET_TORCH_THREADS``); parties share the CPU cores.
        env: extra environment variables for every party's processes.

    Raises:
        PocError: for an unknown modality, a site named like the server, or privacy policies for unknown sites.
    """

    def __init__(
        self,
        workspace: str | Path,
        site_modalities: Mapping[str, str],
        partition_dir: str | Path,
        case_key_secret: str,
        privacy_policies: Mapping[str, Mapping] | None = None,
        server_privacy: Mapping | None = None,
        layout: str = "msd",
        timeouts: PocTimeouts | None = None,
        threads_per_party: int = 1,
        env: Mapping[str, str] | None = None,
    ):
        self.site_modalities = dict(site_modalities)
        if not self.site_modalities:
            raise PocError("site_modalities is empty: a consortium needs at least one site")
        for site, modality in self.site_modalities.items():
            if site == SERVER_NAME or site == ADMIN_USER:
                raise PocError(f"site name {site!r} is reserved for FLARE's POC server/admin")
            if modality not in MODALITIES:
                raise PocError(f"site {site!r} has modality {modality!r}; expected one of {MODALITIES}")
        self.privacy_policies = dict(privacy_policies or {})
        unknown = sorted(set(self.privacy_policies) - set(self.site_modalities))
        if unknown:
            raise PocError(f"privacy policies given for unknown sites {unknown}; sites: {sorted(self.site_modalities)}")
        if not case_key_secret:
            raise PocError("case_key_secret must be a non-empty string")
        self.workspace = Path(workspace).resolve()
        self.partition_dir = Path(partition_dir).resolve()
        self.case_key_secret = case_key_secret
        self.server_privacy = dict(server_privacy) if server_privacy is not None else None
        self.layout = layout
        self.timeouts = timeouts or PocTimeouts()
        self.threads_per_party = int(threads_per_party)
        self.extra_env = dict(env or {})
        self.port: int | None = None
        self._processes: dict[str, subprocess.Popen] = {}
        # Job processes FLARE spawns in their own sessions (setsid): remembered while their parents are alive,
        # because once a parent is gone they are reparented and no longer found as its children.
        self._descendants: dict[int, tuple[str, psutil.Process]] = {}
        self._session = None  # the admin API session, opened on first use
        self.last_stop_report: PocStopReport | None = None

    # -- where things are --------------------------------------------------------------------------------------

    @property
    def sites(self) -> list[str]:
        """The site names, in the order given."""
        return list(self.site_modalities)

    @property
    def parties(self) -> list[str]:
        """Server first, then the sites (the order they are started in)."""
        return [SERVER_NAME, *self.sites]

    @property
    def poc_dir(self) -> Path:
        """The POC workspace (``NVFLARE_POC_WORKSPACE`` for by-hand ``nvflare poc`` commands)."""
        return self.workspace / "poc"

    @property
    def prod_dir(self) -> Path:
        """The provisioned startup kits, one folder per party and one for the admin."""
        return self.poc_dir / PROJECT_NAME / "prod_00"

    @property
    def admin_dir(self) -> Path:
        """The project admin's startup kit (used for the admin API)."""
        return self.prod_dir / ADMIN_USER

    def party_dir(self, party: str) -> Path:
        """A party's FLARE workspace: its ``startup/``, ``local/``, logs and one folder per job."""
        if party not in self.parties:
            raise PocError(f"unknown party {party!r}; parties: {self.parties}")
        return self.prod_dir / party

    def log_files(self, party: str) -> list[Path]:
        """FLARE's log of the party and the console output of its process (what to read when it fails)."""
        return [self.party_dir(party) / FLARE_LOG, self.party_dir(party) / CONSOLE_LOG]

    def _logs(self, party: str) -> str:
        return " and ".join(str(path) for path in self.log_files(party))

    def run_dir(self, job_id: str, party: str) -> Path:
        """The party's folder for a job: what ``workspace_paths.run_dir`` gives inside that party's processes.

        A site keeps it in its workspace. The server archives its run folder into the job store when the job
        ends and deletes it, so for a finished job the archive is downloaded through the admin API and unpacked
        into ``<workspace>/results/<job_id>/server`` (once; later calls return that folder).

        Raises:
            PocError: if the folder does not exist (or the server's archive cannot be fetched).
        """
        live = self.party_dir(party) / job_id
        if live.is_dir() or party != SERVER_NAME:
            if not live.is_dir():
                raise PocError(f"{party} has no run folder for job {job_id} at {live}; see {self._logs(party)}")
            return live
        return self._server_run_dir_from_job_store(job_id)

    # -- prepare -----------------------------------------------------------------------------------------------

    def _cli_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NVFLARE_POC_WORKSPACE"] = str(self.poc_dir)  # honoured first by nvflare 2.9's get_poc_workspace()
        env["HOME"] = str(self.workspace / "nvflare_home")  # `poc prepare` records kits in ~/.nvflare/config.conf
        return env

    def prepare(self) -> Path:
        """Provision the consortium (``nvflare poc prepare -i project.yml --force``) and fill each party's ``local/``.

        Picks a free loopback port, pins every kit to it and writes each party's own settings entry, the
        ``splitunet.`` allow-list entry and its privacy policy.

        Returns:
            the folder of the startup kits (``prod_dir``).

        Raises:
            PocError: if the consortium is running, or provisioning fails (with the command's output).
        """
        if any(process.poll() is None for process in self._processes.values()):
            raise PocError("the consortium is running; stop() it before preparing again")
        # Processes of an earlier consortium in this workspace (e.g. from a killed test run) would keep running
        # on kits that are about to be deleted.
        strays = PocStopReport()
        self._kill_leftovers(strays)
        if strays.survivors:
            raise PocError(f"processes of an earlier POC in {self.prod_dir} survive killing: pids {strays.survivors}")
        self.workspace.mkdir(parents=True, exist_ok=True)
        (self.workspace / "nvflare_home").mkdir(exist_ok=True)
        self.port = find_free_port()
        project_file = self.workspace / "project.yml"  # outside poc_dir: `prepare --force` deletes that folder
        project_file.write_text(yaml.safe_dump(poc_project_config(self.sites, self.port), sort_keys=False))
        command = [sys.executable, "-m", "nvflare.cli", "poc", "prepare", "-i", str(project_file), "--force"]
        log_file = self.workspace / "poc_prepare.log"
        try:
            completed = subprocess.run(
                command,
                env=self._cli_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeouts.prepare_s,
            )
        except subprocess.TimeoutExpired as error:
            raise PocError(f"'nvflare poc prepare' did not finish within {self.timeouts.prepare_s:.0f}s") from error
        log_file.write_text("$ " + " ".join(command) + "\n" + completed.stdout + completed.stderr)
        if completed.returncode != 0 or not (self.prod_dir / SERVER_NAME / "startup").is_dir():
            raise PocError(
                f"'nvflare poc prepare' failed (exit code {completed.returncode}, kits expected in {self.prod_dir}); "
                f"see {log_file}:\n{_tail(log_file)}"
            )
        pin_kits_to_loopback(self.prod_dir, self.sites, self.port)
        for party in self.parties:
            entry = party_settings_entry(party, self.site_modalities, self.partition_dir, self.layout)
            privacy = self.server_privacy if party == SERVER_NAME else self.privacy_policies.get(party)
            write_party_local(self.party_dir(party) / "local", party, entry, self.case_key_secret, privacy)
        return self.prod_dir

    # -- start -------------------------------------------------------------------------------------------------

    def _party_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Each party must read its own local/ settings; a global override would give every party the same file.
        env.pop(SETTINGS_ENV_VAR, None)
        # The kits' scripts call `python3`; it must be this interpreter, where splitunet is installed.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env[THREADS_ENV_VAR] = str(self.threads_per_party)
        env.update(self.extra_env)
        return env

    def _start_party(self, party: str) -> subprocess.Popen:
        startup = self.party_dir(party) / "startup"
        console = open(self.party_dir(party) / CONSOLE_LOG, "a", buffering=1, encoding="utf-8")
        console.write(f"\n--- splitunet.poc start {time.asctime()} ---\n")
        try:
            # `sub_start.sh --once` execs the party's Python directly: no restart loop that would hide a crash
            # behind restarts, no 5 s start delay, and the pid we hold is the party's own process. Its own
            # session (process group) lets stop() signal the party and whatever it started in one call.
            return subprocess.Popen(
                ["bash", str(startup / "sub_start.sh"), "--once"],
                cwd=self.party_dir(party),
                env=self._party_env(),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            console.close()  # the child holds its own descriptor

    def _raise_if_dead(self, during: str) -> None:
        """Raise naming the first party whose process has exited, with the end of its log."""
        self._remember_descendants()
        for party, process in self._processes.items():
            code = process.poll()
            if code is not None:
                flare_log, console = self.log_files(party)
                shown = flare_log if flare_log.is_file() else console
                raise PocError(
                    f"{party} exited (code {code}) {during}; see {self._logs(party)}. "
                    f"Last lines of {shown}:\n{_tail(shown)}"
                )

    def _wait_for_server_port(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._raise_if_dead("while starting")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((LOOPBACK_HOST, self.port)) == 0:
                    return
            time.sleep(0.2)
        raise PocError(
            f"server does not listen on {LOOPBACK_HOST}:{self.port} after {self.timeouts.start_s:.0f}s; "
            f"see {self._logs(SERVER_NAME)}"
        )

    def start(self) -> None:
        """Start the server, then every site, and wait until all sites are connected (bounded by ``start_s``).

        Raises:
            PocError: if a party's process exits (naming it and its log) or a site does not connect in time.
        """
        if self.port is None or not (self.prod_dir / SERVER_NAME / "startup").is_dir():
            raise PocError(f"no startup kits in {self.prod_dir}: call prepare() first")
        if self._processes:
            raise PocError("start() was already called; stop() before starting again")
        deadline = time.monotonic() + self.timeouts.start_s
        self._processes[SERVER_NAME] = self._start_party(SERVER_NAME)
        try:
            # Sites started before the server listens would only log connection errors and retry.
            self._wait_for_server_port(deadline)
            for site in self.sites:
                self._processes[site] = self._start_party(site)
            self._wait_for_sites(deadline)
        except BaseException:
            self.last_stop_report = self.stop()  # no half-started consortium is left behind
            raise

    def _wait_for_sites(self, deadline: float) -> None:
        missing: list[str] = self.sites
        last_error = ""
        while time.monotonic() < deadline:
            self._raise_if_dead("before all sites connected")
            try:
                connected = self._admin(
                    lambda session: [client.name for client in session.get_system_info().client_info],
                    "listing the connected sites",
                    timeout_s=max(deadline - time.monotonic(), 1.0),
                )
                missing = [site for site in self.sites if site not in connected]
                if not missing:
                    return
            except PocError as error:  # server not accepting admin logins yet
                last_error = f"; last admin error: {error}"
            time.sleep(self.timeouts.poll_s)
        logs = {site: str(self.log_files(site)[0]) for site in missing}
        first_log = self.log_files(missing[0])[0]
        raise PocError(
            f"site(s) {missing} did not connect to the server at {LOOPBACK_HOST}:{self.port} within "
            f"{self.timeouts.start_s:.0f}s{last_error}; see their logs {logs} and {self.log_files(SERVER_NAME)[0]}. "
            f"Last lines of {first_log}:\n{_tail(first_log)}"
        )

    # -- admin API ---------------------------------------------------------------------------------------------

    def _admin(self, command: Callable, what: str, timeout_s: float | None = None):
        """Run ``command(session)`` with the project admin's session, bounded in time.

        One session is reused (each new one logs in and prints "Connecting to FLARE"); after any failure it is
        dropped, so the next call logs in afresh instead of reusing a broken or abandoned session.
        """
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        timeout_s = timeout_s or self.timeouts.admin_call_s

        def call():
            if self._session is None:
                self._session = new_secure_session(ADMIN_USER, str(self.admin_dir), timeout=min(timeout_s, 10.0))
            return command(self._session)

        try:
            return _call_bounded(call, timeout_s, what)
        except Exception as error:
            self._drop_session()
            if isinstance(error, PocError):
                raise
            raise PocError(f"{what} failed: {type(error).__name__}: {error}") from error

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                _call_bounded(session.close, 5.0, "closing the admin session")
            except Exception:  # the server may be gone; nothing is left to close then
                pass

    def submit(self, job_dir: str | Path) -> str:
        """Submit a job folder as the project admin.

        Returns:
            the job id.

        Raises:
            PocError: if a party is not running or the server refuses the job.
        """
        job_dir = Path(job_dir).resolve()
        if not (job_dir / "meta.json").is_file():
            raise PocError(f"{job_dir} is not a FLARE job folder (no meta.json)")
        if not self._processes:
            raise PocError("the consortium is not running: call start() first")
        self._raise_if_dead("before the job was submitted")
        return self._admin(lambda session: session.submit_job(str(job_dir)), f"submitting {job_dir}")

    def job_meta(self, job_id: str, timeout_s: float | None = None) -> dict:
        """The server's meta data of a job (``status``, ``submit_time``, ...)."""
        return self._admin(
            lambda session: session.get_job_meta(job_id), f"reading the status of job {job_id}", timeout_s
        )

    def wait(self, job_id: str, timeout_s: float) -> str:
        """Wait until the job ends, checking on every poll that every party is still alive.

        Returns:
            FLARE's final job status, e.g. ``"FINISHED:COMPLETED"``. A run that the workflow stopped with an error
            also finishes: the server's ``results.json`` holds the run's own status.

        Raises:
            PocError: if a party's process dies (naming it and its log) or the job outlasts ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        status, last_error = None, ""
        while time.monotonic() < deadline:
            self._raise_if_dead(f"while job {job_id} was running")
            try:
                remaining = max(deadline - time.monotonic(), 1.0)
                status = self.job_meta(job_id, min(self.timeouts.admin_call_s, remaining)).get("status")
            except PocError as error:  # a slow reply while every party is alive: ask again until the deadline
                last_error = f"; last admin error: {error}"
            if _is_terminal(status):
                return status
            time.sleep(self.timeouts.poll_s)
        raise PocError(
            f"job {job_id} did not finish within {timeout_s:.0f}s (last status {status}{last_error}); "
            f"see {self.log_files(SERVER_NAME)[0]} and each site's {FLARE_LOG}"
        )

    def _server_run_dir_from_job_store(self, job_id: str) -> Path:
        results = self.workspace / "results" / job_id
        target = results / SERVER_NAME
        if target.is_dir():
            return target
        staging = results / "download"
        shutil.rmtree(staging, ignore_errors=True)
        location = self._admin(
            lambda session: session.download_job_result(job_id, str(staging)),
            f"downloading the server's workspace of job {job_id}",
        )
        # The download holds the job definition ("job") and the server's archived run folder ("workspace"): a
        # folder, as the 2.9 admin client unpacks it, or the zip itself.
        workspace = Path(location or staging) / "workspace"
        if workspace.is_dir():
            shutil.move(str(workspace), str(target))
        elif zipfile.is_zipfile(workspace):
            with zipfile.ZipFile(workspace) as archive:
                archive.extractall(target)
        else:
            raise PocError(f"the download of job {job_id} has no server workspace at {workspace}")
        shutil.rmtree(staging, ignore_errors=True)
        return target

    # -- processes ---------------------------------------------------------------------------------------------

    def _remember_descendants(self) -> None:
        for party, process in self._processes.items():
            try:
                children = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                self._descendants.setdefault(child.pid, (f"{party} job process", child))

    def _workspace_processes(self) -> list[tuple[str, psutil.Process]]:
        """Processes started from this consortium's kits, found by their command line naming ``prod_dir``.

        Catches job processes that were reparented before they could be remembered.
        """
        marker, found = str(self.prod_dir), []
        for process in psutil.process_iter(["cmdline"]):  # process_iter skips processes that vanish meanwhile
            cmdline = process.info.get("cmdline") or []
            if process.pid != os.getpid() and any(marker in part for part in cmdline) and _is_alive(process):
                found.append((f"process of {marker}", process))
        return found

    def processes(self) -> list[psutil.Process]:
        """Every live process of the consortium: the parties, their job processes and strays found by path."""
        self._remember_descendants()
        alive: dict[int, psutil.Process] = {}
        for process in self._processes.values():
            found = _process_or_none(process.pid) if process.poll() is None else None
            if found is not None:
                alive[process.pid] = found
        for _, process in [*self._descendants.values(), *self._workspace_processes()]:
            if _is_alive(process):
                alive.setdefault(process.pid, process)
        return list(alive.values())

    def listening_addresses(self) -> set[tuple[str, int]]:
        """``(ip, port)`` of every TCP socket the consortium's processes listen on (to check loopback only)."""
        addresses = set()
        for process in self.processes():
            try:
                connections = process.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            addresses |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
        return addresses

    # -- stop --------------------------------------------------------------------------------------------------

    def stop(self) -> PocStopReport:
        """Shut the consortium down: admin shutdown (aborting a running job), bounded wait, then kill what is left.

        Safe to call more than once, after a failed start, and when nothing was started (it then only looks for
        strays of this workspace).

        Returns:
            what happened; ``report.all_stopped`` tells whether every process is gone.
        """
        report = PocStopReport()
        self._remember_descendants()
        if self._processes:
            # Without the server nobody tells the sites to stop: they would retry forever, so skip the wait.
            if self._request_shutdown(report):
                self._wait_for_exit(report, time.monotonic() + self.timeouts.stop_s)
                report.graceful = not report.errors
        self._kill_leftovers(report)
        self._processes.clear()
        self._descendants.clear()
        self.last_stop_report = report
        return report

    def _request_shutdown(self, report: PocStopReport) -> bool:
        server = self._processes.get(SERVER_NAME)
        if server is None or server.poll() is not None:
            report.errors.append(f"server is not running (exit code {server.returncode if server else None})")
            return False
        try:
            self._admin(self._shutdown_all, "admin shutdown", timeout_s=self.timeouts.stop_s)
            return True
        except PocError as error:
            report.errors.append(str(error))
            return False

    def _shutdown_all(self, session) -> None:
        from nvflare.tool.api_utils import shutdown_system_by_session

        # Aborts running jobs first: FLARE does not shut down under a running job. The call closes the session.
        shutdown_system_by_session(session, timeout_in_sec=int(self.timeouts.stop_s), wait=False, verbose=False)
        self._session = None

    def _wait_for_exit(self, report: PocStopReport, deadline: float) -> None:
        # The server tells the connected sites to stop, then stops itself. A site that never connected (or lost
        # the server) gets no shutdown and would retry for ever, so once the server is gone sites get a short
        # grace period only.
        parties = [SERVER_NAME, *[site for site in self._processes if site != SERVER_NAME]]
        for party in parties:
            if party != SERVER_NAME:
                deadline = min(deadline, time.monotonic() + _SITE_EXIT_GRACE_S)
            try:
                self._processes[party].wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                report.errors.append(f"{party} did not exit within {self.timeouts.stop_s:.0f}s of the shutdown")
            self._remember_descendants()  # job processes of parties still alive

    def _kill_leftovers(self, report: PocStopReport, grace_s: float = 5.0) -> None:
        """SIGTERM every remaining process of the consortium, then SIGKILL what outlives ``grace_s``."""
        leftovers: dict[int, tuple[str, psutil.Process]] = {}
        for party, process in self._processes.items():
            found = _process_or_none(process.pid) if process.poll() is None else None
            if found is not None:
                leftovers[process.pid] = (party, found)
        for name, process in [*self._descendants.values(), *self._workspace_processes()]:
            if _is_alive(process):
                leftovers.setdefault(process.pid, (name, process))
        for pid, (name, process) in leftovers.items():
            try:
                process.terminate()
                report.killed.append(f"{name} pid={pid}")
            except psutil.NoSuchProcess:
                pass
        _, stubborn = psutil.wait_procs([process for _, process in leftovers.values()], timeout=grace_s)
        for process in stubborn:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        # A party's process group may also hold helpers it started without a session of their own.
        for process in self._processes.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(timeout=grace_s)  # reap, so the pid is not left as a zombie of this process
            except subprocess.TimeoutExpired:
                pass
        _, still_alive = psutil.wait_procs(stubborn, timeout=grace_s)
        strays = {process.pid for _, process in self._workspace_processes()}
        report.survivors = sorted({process.pid for process in still_alive} | strays)

    # -- context manager ---------------------------------------------------------------------------------------

    def __enter__(self) -> PocConsortium:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        report = self.stop()
        if not report.all_stopped and exc_type is None:
            raise PocError(f"POC processes survived stop(): pids {report.survivors}; errors: {report.errors}")
