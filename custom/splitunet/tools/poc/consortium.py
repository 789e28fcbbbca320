"""PocConsortium: prepare, start, run jobs on and stop a FLARE POC consortium on loopback.

The steps themselves live beside it: the kits in :mod:`splitunet.tools.poc.kits`, the processes in
:mod:`splitunet.tools.poc.processes`, the admin API in
:mod:`splitunet.tools.poc.admin`. This module decides their order and
bounds every wait by :class:`~splitunet.tools.poc.timeouts.PocTimeouts`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from splitunet.tools.deployment import recorded_layout
from splitunet.tools.poc.admin import AdminSession, is_terminal_status
from splitunet.tools.poc.errors import PocError, log_tail
from splitunet.tools.poc.kits import (
    ADMIN_USER,
    LOOPBACK_HOST,
    PROJECT_NAME,
    SERVER_NAME,
    find_free_port,
    party_settings_entry,
    pin_kits_to_loopback,
    poc_project_config,
    provision_kits,
    set_heart_beat_timeout,
    write_party_local,
)
from splitunet.tools.poc.processes import FLARE_LOG, PartyProcesses, launch_party, party_environment, party_log_files
from splitunet.tools.poc.timeouts import PocTimeouts
from splitunet.wire.protocol import MODALITIES

__all__ = ["PocConsortium", "PocStopReport"]

# Seconds a site may take to exit after the server has: enough to finish a shutdown it received.
_SITE_EXIT_GRACE_S = 10.0


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
        layout: label layout of the server's labels (``msd``, ``brats2021``, ...); default: the one the partition
            recorded.
        timeouts: bounds of each step.
        threads_per_party: torch threads per party (``$SPLITUNET_TORCH_THREADS``); parties share the CPU cores.
        env: extra environment variables for every party's processes.
        evaluation: an evaluation consortium, whose parties allow the capture filter (see
            :func:`splitunet.tools.deployment.allow_splitunet_classes`).
        heart_beat_timeout_s: seconds without a site's heartbeat after which the server logs the site out (FLARE's
            kits say 600); a test of lost sites lowers it (:func:`~splitunet.tools.poc.kits.set_heart_beat_timeout`).
        host: the address the server listens on and every party connects to; loopback by default. Another
            address must be this process's own (the harness, with its admin client, runs beside the server), as
            in a network namespace of :mod:`splitunet.tools.netns_links`.
        party_prefixes: party -> command prefix its process is started with, e.g. ``ip netns exec <namespace>``
            to run a site in a namespace of its own (parties not named start plainly).

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
        layout: str | None = None,
        timeouts: PocTimeouts | None = None,
        threads_per_party: int = 1,
        env: Mapping[str, str] | None = None,
        evaluation: bool = False,
        heart_beat_timeout_s: float | None = None,
        host: str = LOOPBACK_HOST,
        party_prefixes: Mapping[str, Sequence[str]] | None = None,
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
        self.evaluation = bool(evaluation)
        self.server_privacy = dict(server_privacy) if server_privacy is not None else None
        self.layout = layout
        self.timeouts = timeouts or PocTimeouts()
        self.threads_per_party = int(threads_per_party)
        self.extra_env = dict(env or {})
        if heart_beat_timeout_s is not None and not heart_beat_timeout_s > 0:
            raise PocError(f"heart_beat_timeout_s must be > 0, got {heart_beat_timeout_s}")
        self.heart_beat_timeout_s = heart_beat_timeout_s
        self.host = str(host)
        self.party_prefixes = {party: list(prefix) for party, prefix in (party_prefixes or {}).items()}
        unknown = sorted(set(self.party_prefixes) - {SERVER_NAME, *self.site_modalities})
        if unknown:
            raise PocError(f"party_prefixes given for unknown parties {unknown}; parties: {self.parties}")
        self.port: int | None = None
        self._processes = PartyProcesses(self.prod_dir)
        self._admin = AdminSession(self.admin_dir, self.timeouts.admin_call_s)
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
        return party_log_files(self.party_dir(party))

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
        downloaded = self.workspace / "results" / job_id / SERVER_NAME
        if downloaded.is_dir():
            return downloaded
        return self._admin.download_server_workspace(job_id, downloaded)

    # -- prepare -----------------------------------------------------------------------------------------------

    def prepare(self) -> Path:
        """Provision the consortium (``nvflare poc prepare -i project.yml --force``) and fill each party's ``local/``.

        Picks a free loopback port, pins every kit to it and writes each party's own settings entry, the
        ``splitunet.`` allow-list entry and its privacy policy.

        Returns:
            the folder of the startup kits (``prod_dir``).

        Raises:
            PocError: if the consortium is running, or provisioning fails (with the command's output).
        """
        if self._processes.any_running():
            raise PocError("the consortium is running; stop() it before preparing again")
        # Processes of an earlier consortium in this workspace (e.g. from a killed test run) would keep running
        # on kits that are about to be deleted.
        _, survivors = self._processes.kill_all()
        if survivors:
            raise PocError(f"processes of an earlier POC in {self.prod_dir} survive killing: pids {survivors}")
        self.port = find_free_port(self.host)
        project = poc_project_config(self.sites, self.port)
        provision_kits(project, self.workspace, self.poc_dir, self.prod_dir, self.timeouts.prepare_s)
        pin_kits_to_loopback(self.prod_dir, self.sites, self.port, self.host)
        for party in self.parties:
            # The labels' numbering, as `splitunet partition` recorded it unless given.
            layout = self.layout or recorded_layout(self.partition_dir)
            entry = party_settings_entry(party, self.site_modalities, self.partition_dir, layout)
            privacy = self.server_privacy if party == SERVER_NAME else self.privacy_policies.get(party)
            write_party_local(
                self.party_dir(party) / "local", party, entry, self.case_key_secret, privacy, self.evaluation
            )
        if self.heart_beat_timeout_s is not None:
            set_heart_beat_timeout(self.party_dir(SERVER_NAME), self.heart_beat_timeout_s)
        return self.prod_dir

    # -- start -------------------------------------------------------------------------------------------------

    def _start_party(self, party: str) -> None:
        env = party_environment(self.threads_per_party, self.extra_env)
        self._processes.add(party, launch_party(self.party_dir(party), env, self.party_prefixes.get(party, ())))

    def _raise_if_dead(self, during: str) -> None:
        """Raise naming the first party whose process has exited, with the end of its log."""
        exited = self._processes.poll()
        if exited is not None:
            party, code = exited
            flare_log, console = self.log_files(party)
            shown = flare_log if flare_log.is_file() else console
            raise PocError(
                f"{party} exited (code {code}) {during}; see {self._logs(party)}. "
                f"Last lines of {shown}:\n{log_tail(shown)}"
            )

    def _wait_for_server_port(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._raise_if_dead("while starting")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.2)
        raise PocError(
            f"server does not listen on {self.host}:{self.port} after {self.timeouts.start_s:.0f}s; "
            f"see {self._logs(SERVER_NAME)}"
        )

    def start(self) -> None:
        """Start the server, then every site, and wait until all sites are connected (bounded by ``start_s``).

        Raises:
            PocError: if a party's process exits (naming it and its log) or a site does not connect in time.
        """
        if self.port is None or not (self.prod_dir / SERVER_NAME / "startup").is_dir():
            raise PocError(f"no startup kits in {self.prod_dir}: call prepare() first")
        if self._processes.started:
            raise PocError("start() was already called; stop() before starting again")
        deadline = time.monotonic() + self.timeouts.start_s
        self._start_party(SERVER_NAME)
        try:
            # Sites started before the server listens would only log connection errors and retry.
            self._wait_for_server_port(deadline)
            for site in self.sites:
                self._start_party(site)
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
                connected = self._admin.connected_sites(timeout_s=max(deadline - time.monotonic(), 1.0))
                missing = [site for site in self.sites if site not in connected]
                if not missing:
                    return
            except PocError as error:  # server not accepting admin logins yet
                last_error = f"; last admin error: {error}"
            time.sleep(self.timeouts.poll_s)
        logs = {site: str(self.log_files(site)[0]) for site in missing}
        first_log = self.log_files(missing[0])[0]
        raise PocError(
            f"site(s) {missing} did not connect to the server at {self.host}:{self.port} within "
            f"{self.timeouts.start_s:.0f}s{last_error}; see their logs {logs} and {self.log_files(SERVER_NAME)[0]}. "
            f"Last lines of {first_log}:\n{log_tail(first_log)}"
        )

    def connected_sites(self, timeout_s: float | None = None) -> list[str]:
        """Names of the clients the server lists as connected now, as the admin API reports them.

        Any client the server has admitted is listed, also one that is not a site of this consortium; so a client
        that must be kept out (e.g. one with a foreign certificate) can be checked for by name.

        Args:
            timeout_s: bound of the admin call (default: ``timeouts.admin_call_s``).

        Raises:
            PocError: if the consortium is not running, or the admin call fails or outlasts its bound.
        """
        if not self._processes.started:
            raise PocError("the consortium is not running: call start() first")
        self._raise_if_dead("before the connected sites were listed")
        return self._admin.connected_sites(timeout_s)

    # -- jobs --------------------------------------------------------------------------------------------------

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
        if not self._processes.started:
            raise PocError("the consortium is not running: call start() first")
        self._raise_if_dead("before the job was submitted")
        return self._admin.submit_job(job_dir)

    def job_meta(self, job_id: str, timeout_s: float | None = None) -> dict:
        """The server's meta data of a job (``status``, ``submit_time``, ...)."""
        return self._admin.job_meta(job_id, timeout_s)

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
            if is_terminal_status(status):
                return status
            time.sleep(self.timeouts.poll_s)
        raise PocError(
            f"job {job_id} did not finish within {timeout_s:.0f}s (last status {status}{last_error}); "
            f"see {self.log_files(SERVER_NAME)[0]} and each site's {FLARE_LOG}"
        )

    def abort(self, job_id: str) -> str:
        """Abort a job through the admin API, as ``abort_job`` in the admin console; returns the server's message.

        Raises:
            PocError: if the admin call fails or outlasts its bound.
        """
        return self._admin.abort_job(job_id)

    # -- processes ---------------------------------------------------------------------------------------------

    def kill_party(self, party: str) -> list[str]:
        """Kill a party's process and its job processes at once (SIGKILL), as a crash or a lost machine would.

        The party gets no chance to log out, so the server learns of it only when its heartbeat is missed
        (``heart_beat_timeout_s``). From then on :meth:`wait` no longer checks that party, and :meth:`stop` does
        not wait for it.

        Returns:
            ``"<party or job process> pid=<pid>"`` for each process killed.

        Raises:
            PocError: for an unknown or not started party, or a process that survives SIGKILL.
        """
        if party not in self.parties:
            raise PocError(f"unknown party {party!r}; parties: {self.parties}")
        if self._processes.get(party) is None:
            raise PocError(f"{party} is not running (not started, or killed before)")
        killed, survivors = self._processes.kill_party(party)
        if survivors:
            raise PocError(f"processes of {party} survive SIGKILL: pids {survivors}")
        return killed

    def processes(self) -> list[psutil.Process]:
        """Every live process of the consortium: the parties, their job processes and strays found by path."""
        return self._processes.alive()

    def listening_addresses(self) -> set[tuple[str, int]]:
        """``(ip, port)`` of every TCP socket the consortium's processes listen on (to check loopback only)."""
        return self._processes.listening_addresses()

    # -- stop --------------------------------------------------------------------------------------------------

    def stop(self) -> PocStopReport:
        """Shut the consortium down: admin shutdown (aborting a running job), bounded wait, then kill what is left.

        Safe to call more than once, after a failed start, and when nothing was started (it then only looks for
        strays of this workspace).

        Returns:
            what happened; ``report.all_stopped`` tells whether every process is gone.
        """
        report = PocStopReport()
        self._processes.remember_descendants()
        if self._processes.started:
            # Without the server nobody tells the sites to stop: they would retry forever, so skip the wait.
            if self._request_shutdown(report):
                # The server tells the connected sites to stop, then stops itself. A site that never connected
                # (or lost the server) gets no shutdown and would retry for ever, so once the server is gone
                # sites get a short grace period only.
                deadline = time.monotonic() + self.timeouts.stop_s
                for party in self._processes.wait_for_exit(SERVER_NAME, deadline, _SITE_EXIT_GRACE_S):
                    report.errors.append(f"{party} did not exit within {self.timeouts.stop_s:.0f}s of the shutdown")
                report.graceful = not report.errors
        report.killed, report.survivors = self._processes.kill_all()
        self._processes.clear()
        self.last_stop_report = report
        return report

    def _request_shutdown(self, report: PocStopReport) -> bool:
        server = self._processes.get(SERVER_NAME)
        if server is None or server.poll() is not None:
            report.errors.append(f"server is not running (exit code {server.returncode if server else None})")
            return False
        try:
            self._admin.shutdown_system(self.timeouts.stop_s)
            return True
        except PocError as error:
            report.errors.append(str(error))
            return False

    # -- context manager ---------------------------------------------------------------------------------------

    def __enter__(self) -> PocConsortium:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        report = self.stop()
        if not report.all_stopped and exc_type is None:
            raise PocError(f"POC processes survived stop(): pids {report.survivors}; errors: {report.errors}")
