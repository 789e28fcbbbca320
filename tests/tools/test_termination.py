"""termination: a SIGTERM to the splitunet program still stops the process sessions it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from splitunet.tools import cli

# A parent that starts a child in a session of its own (as the simulator runner does) and kills that session in a
# `finally` block; it prints the child's pid and waits.
_PARENT = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    from splitunet.tools.termination import exit_on_sigterm
    if sys.argv[1] == "handled":
        exit_on_sigterm()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        print(child.pid, flush=True)
        child.wait()
    finally:
        os.killpg(child.pid, signal.SIGKILL)
    """
)


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _terminate_parent(mode: str) -> tuple[int, int]:
    """Start the parent, SIGTERM it once its child runs; its exit code and the child's pid."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, mode], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGTERM)
        return parent.wait(timeout=30), child_pid
    finally:
        parent.kill()
        parent.wait(timeout=30)


def test_sigterm_runs_the_cleanup_that_stops_the_child_session():
    code, child_pid = _terminate_parent("handled")
    assert code == 128 + signal.SIGTERM
    assert _gone(child_pid, within_s=10)


def test_without_it_a_sigterm_leaves_the_child_running():
    """Why the handler exists: Python's default SIGTERM skips the `finally` that kills the child."""
    code, child_pid = _terminate_parent("default")
    try:
        assert code == -signal.SIGTERM
        assert not _gone(child_pid, within_s=1)
    finally:
        try:
            os.killpg(child_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_program_installs_it_a_caller_of_main_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "exit_on_sigterm", lambda: calls.append(True))
    monkeypatch.setattr(sys, "argv", ["splitunet", "--no-such-option"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [True]
    with pytest.raises(SystemExit):
        cli.main(["--no-such-option"])
    assert calls == [True]
