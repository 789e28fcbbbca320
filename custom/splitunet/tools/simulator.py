"""Run a job in the FLARE simulator as a child process, bounded in time, with a readable progress view."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from splitunet.errors import SplitUNetConfigError

__all__ = ["run_simulator", "find_run_file", "completed_server_results", "PROGRESS_PATTERN"]

# Log lines worth echoing to a person watching the run; the full log goes to a file.
PROGRESS_PATTERN = re.compile(
    r"iteration \d+/\d+|validation at iteration|training \d+ iterations|left out|"
    r"Split-U-Net run stopped|failed task|did not answer|results written"
)


def run_simulator(
    job_dir: str | Path,
    workspace: str | Path,
    clients: Sequence[str],
    log_file: str | Path,
    timeout_s: float = 3600.0,
    env: Mapping[str, str] | None = None,
    echo: bool = True,
) -> int:
    """``nvflare simulator JOB -w WS -c site-1,... -t N``, its site-naming race guarded; returns its exit code.

    Raises:
        SplitUNetConfigError: when the run outlasts ``timeout_s`` (the simulator is killed first).
    """
    command = [
        sys.executable,
        "-m",
        "splitunet.flare.simulator_cli",
        str(job_dir),
        "-w",
        str(workspace),
        "-c",
        ",".join(clients),
        "-t",
        str(len(clients)),
    ]
    full_env = dict(os.environ, **(env or {}))
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        # A watchdog, because a silent hang would never wake the line loop below.
        watchdog = threading.Timer(timeout_s, _kill_group, args=(process,))
        watchdog.start()
        try:
            for line in process.stdout:
                log.write(line)
                if echo and PROGRESS_PATTERN.search(line):
                    message = line.split(" - ", 3)[-1].strip() if " - " in line else line.strip()
                    print(f"  {message}", flush=True)
            return_code = process.wait()
        finally:
            timed_out = watchdog.finished.is_set()  # set before cancel() only if the watchdog fired
            watchdog.cancel()
            _kill_group(process)  # the simulator's workers must not outlive it
    if timed_out:
        raise SplitUNetConfigError(f"simulator run exceeded {timeout_s:.0f}s and was stopped; see {log_file}")
    return return_code


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def find_run_file(workspace: str | Path, party: str, name: str) -> Path | None:
    """A file a party wrote in its run folder of a simulator workspace (e.g. the server's ``results.json``)."""
    matches = sorted(Path(workspace, party).glob(f"**/{name}"))
    return matches[0] if matches else None


def completed_server_results(workspace: str | Path, return_code: int, log_file: str | Path) -> tuple[Path, dict]:
    """The server's ``results.json`` of a finished simulator run, and its path.

    Raises:
        SplitUNetConfigError: the server wrote no results, or the run did not complete (its error is quoted).
    """
    path = find_run_file(workspace, "server", "results.json")
    if path is None:
        raise SplitUNetConfigError(f"the simulator (exit code {return_code}) wrote no results; see {log_file}")
    results = json.loads(path.read_text())
    if results.get("status") != "completed":
        raise SplitUNetConfigError(f"the run ended {results.get('status')}: {results.get('error')}; see {log_file}")
    return path, results
