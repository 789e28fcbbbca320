"""The project admin's session with the POC server: connect, submit, job status, abort, download, shutdown.

FLARE's admin client has no overall deadline for a command (a connect can retry, an upload can stall), so every
command runs through :func:`_call_bounded`, which keeps the deadline itself.
"""

from __future__ import annotations

import shutil
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from splitunet.tools.poc.errors import PocError
from splitunet.tools.poc.kits import ADMIN_USER

__all__ = ["AdminSession", "is_terminal_status"]

T = TypeVar("T")

# Job statuses FLARE reports once a job can no longer change (see flare_api._is_terminal_job_status).
_TERMINAL_PREFIX = "FINISHED"
_TERMINAL_LEGACY = {"ABORTED", "ABANDONED", "FAILED"}


def is_terminal_status(status: str | None) -> bool:
    """True for a job status that can no longer change (finished, aborted, abandoned, failed)."""
    return isinstance(status, str) and (status.startswith(_TERMINAL_PREFIX) or status in _TERMINAL_LEGACY)


def _call_bounded(function: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``function`` in a helper thread and give up after ``timeout_s``.

    A call that times out is abandoned in its daemon thread.

    Raises:
        PocError: naming ``what`` if the call outlasts ``timeout_s``; an error of ``function`` passes through.
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


class AdminSession:
    """The project admin's FLARE API session, opened on first use; each command bounded in time.

    One session is reused (each new one logs in and prints "Connecting to FLARE"); after any failure it is
    dropped, so the next command logs in afresh instead of reusing a broken or abandoned session.

    Args:
        admin_dir: the project admin's startup kit.
        timeout_s: bound of a command that is given none.
    """

    def __init__(self, admin_dir: Path, timeout_s: float):
        self.admin_dir = Path(admin_dir)
        self.timeout_s = timeout_s
        self._session = None

    def call(self, command: Callable, what: str, timeout_s: float | None = None):
        """Run ``command(session)``, bounded by ``timeout_s`` (default: the session's bound).

        Raises:
            PocError: naming ``what``, if the command fails or outlasts its bound.
        """
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        timeout_s = timeout_s or self.timeout_s

        def call():
            if self._session is None:
                self._session = new_secure_session(ADMIN_USER, str(self.admin_dir), timeout=min(timeout_s, 10.0))
            return command(self._session)

        try:
            return _call_bounded(call, timeout_s, what)
        except Exception as error:
            self.close()
            if isinstance(error, PocError):
                raise
            raise PocError(f"{what} failed: {type(error).__name__}: {error}") from error

    def close(self) -> None:
        """Close the session, if one is open; the next command logs in afresh."""
        session, self._session = self._session, None
        if session is not None:
            try:
                _call_bounded(session.close, 5.0, "closing the admin session")
            except Exception:  # the server may be gone; nothing is left to close then
                pass

    def connected_sites(self, timeout_s: float | None = None) -> list[str]:
        """Names of the sites connected to the server now."""
        return self.call(
            lambda session: [client.name for client in session.get_system_info().client_info],
            "listing the connected sites",
            timeout_s,
        )

    def submit_job(self, job_dir: Path) -> str:
        """Submit a job folder; returns the job id."""
        return self.call(lambda session: session.submit_job(str(job_dir)), f"submitting {job_dir}")

    def job_meta(self, job_id: str, timeout_s: float | None = None) -> dict:
        """The server's meta data of a job (``status``, ``submit_time``, ...)."""
        return self.call(lambda session: session.get_job_meta(job_id), f"reading the status of job {job_id}", timeout_s)

    def abort_job(self, job_id: str) -> str:
        """Abort a job (FLARE's ``abort_job``); returns the server's message. A finished job is left as it is."""
        return self.call(lambda session: session.abort_job(job_id), f"aborting job {job_id}")

    def download_server_workspace(self, job_id: str, target: Path) -> Path:
        """Download a finished job's archived server run folder from the job store and unpack it as ``target``.

        Staging happens in ``download/`` beside ``target``.

        Raises:
            PocError: if the download fails or holds no server workspace.
        """
        staging = target.parent / "download"
        shutil.rmtree(staging, ignore_errors=True)
        location = self.call(
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

    def shutdown_system(self, timeout_s: float) -> None:
        """Shut the server and every connected site down, aborting running jobs first; bounded by ``timeout_s``."""

        def shutdown(session) -> None:
            from nvflare.tool.api_utils import shutdown_system_by_session

            # Aborts running jobs first: FLARE does not shut down under a running job. The call closes the session.
            shutdown_system_by_session(session, timeout_in_sec=int(timeout_s), wait=False, verbose=False)
            self._session = None

        self.call(shutdown, "admin shutdown", timeout_s)
