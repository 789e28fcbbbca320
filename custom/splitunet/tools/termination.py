"""Let SIGTERM unwind the ``splitunet`` program the way Ctrl-C does, so the cleanup of its child processes runs."""

from __future__ import annotations

import signal
import threading

__all__ = ["exit_on_sigterm"]


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` for the rest of the program.

    Python's default SIGTERM ends the process at once and skips every ``finally`` block. The simulator and the POC
    parties run in sessions of their own (so that one signal reaches all their workers), which a skipped cleanup
    leaves running: a ``kill`` of ``splitunet compare`` would leave its simulator training on. A second SIGTERM,
    while the first unwinds, ends the process at once as before.

    Does nothing outside the main thread or where SIGTERM already has a handler (a host program's own).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _unwind)


def _unwind(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(128 + signum)
