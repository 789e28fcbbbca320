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
        case_key: the case's keyed hash, where the message must not carry the case ID (what a party writes where
            others read it, see :mod:`splitunet.data.case_keys`).
    """

    def __init__(
        self,
        message: str,
        *,
        party: str | None = None,
        case: str | None = None,
        file: str | PathLike | None = None,
        case_key: str | None = None,
    ):
        self.message = message
        self.party = party
        self.case = case
        self.file = None if file is None else str(file)
        self.case_key = case_key
        fields = (("party", party), ("case", case), ("case key", case_key), ("file", self.file))
        where = ", ".join(f"{name}={value}" for name, value in fields if value)
        super().__init__(f"[{where}] {message}" if where else message)


class SplitUNetConfigError(ValueError):
    """Invalid configuration (job config, site-local data settings, CLI arguments)."""
