"""The POC harness's error, and the end of a log file that its messages quote."""

from __future__ import annotations

from pathlib import Path

from splitunet.errors import SplitUNetConfigError

__all__ = ["PocError", "log_tail"]


class PocError(SplitUNetConfigError):
    """The POC consortium could not be prepared, started, run or stopped; the message names party and log file."""


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, or a note that it cannot be read (an error message is never lost)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} is not readable)"
    return "\n".join(text[-lines:])
