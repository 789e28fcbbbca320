"""Errors that name the party, case and file they concern."""

from __future__ import annotations

from os import PathLike

__all__ = ["SplitUNetDataError", "SplitUNetConfigError"]


class SplitUNetDataError(ValueError):
    """Bad input data, reported with the party, case and file it was found in.

    Args:
        message: what is wrong, in words a site administrator can act on.
        party: site or server name (e.g. ``"site-1"``, ``"server"``), if known.
        case: case identifier (e.g. ``"BRATS_001"``), if known.
        file: path of the offending file or folder, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        party: str | None = None,
        case: str | None = None,
        file: str | PathLike | None = None,
    ):
        self.message = message
        self.party = party
        self.case = case
        self.file = None if file is None else str(file)
        where = ", ".join(
            f"{name}={value}" for name, value in (("party", party), ("case", case), ("file", self.file)) if value
        )
        super().__init__(f"[{where}] {message}" if where else message)


class SplitUNetConfigError(ValueError):
    """Invalid configuration (job config, site-local data settings, CLI arguments)."""
