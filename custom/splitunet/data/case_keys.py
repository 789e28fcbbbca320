"""Keyed case hashes: how parties agree on shared cases without sending patient IDs.

The data holders share a secret out of band; each turns its case IDs into ``HMAC-SHA256(secret, case_id)`` keys
and sends only the keys. Without the secret, a key cannot be checked against a guessed patient ID (which a plain
hash would allow).

What a party writes where others read it (a task reply, the server's run folder that FLARE archives) names a case
by its full key, never by its ID, and none of the party's data paths: :func:`scrub_private` and
:class:`PrivateNames` replace them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from splitunet.atomic_files import write_text_atomic
from splitunet.errors import SplitUNetDataError

__all__ = [
    "KEY_LENGTH",
    "case_key",
    "keys_to_case_ids",
    "CaseMatch",
    "match_case_keys",
    "read_or_create_secret",
    "scrub_private",
    "PrivateNames",
]

# Hex characters kept: 128 bits, ample against collisions among thousands of cases, short in logs.
KEY_LENGTH = 32


def case_key(case_id: str, secret: str) -> str:
    """Keyed hash of a case ID.

    Args:
        case_id: the party's case identifier (e.g. ``"BRATS_001"``); must match across parties exactly.
        secret: secret shared by the data holders, never sent to the server.

    Returns:
        the first :data:`KEY_LENGTH` hex characters of ``HMAC-SHA256(secret, case_id)``.

    Raises:
        ValueError: empty secret or case ID.
    """
    if not isinstance(secret, str) or not secret:
        raise ValueError("case key secret must be a non-empty string")
    if not isinstance(case_id, str) or not case_id:
        raise ValueError("case ID must be a non-empty string")
    return hmac.new(secret.encode("utf-8"), case_id.encode("utf-8"), hashlib.sha256).hexdigest()[:KEY_LENGTH]


def keys_to_case_ids(case_ids: Iterable[str], secret: str, *, party: str) -> dict[str, str]:
    """Map each case's key back to its ID (only a data holder can build this map).

    Raises:
        SplitUNetDataError: if two case IDs collide on one key.
    """
    mapping: dict[str, str] = {}
    for case_id in case_ids:
        key = case_key(case_id, secret)
        if key in mapping:
            raise SplitUNetDataError(
                f"case IDs {mapping[key]!r} and {case_id!r} share a key", party=party, case=case_id
            )
        mapping[key] = case_id
    return mapping


@dataclass
class CaseMatch:
    """Which keyed cases the parties share.

    Attributes:
        common: keys present at every party, sorted.
        missing: for each party that lacks some, the keys present at another party but not at this one, sorted.
            Parties that lack nothing are absent.
    """

    common: list[str] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)


def match_case_keys(party_keys: Mapping[str, Iterable[str]]) -> CaseMatch:
    """Find the cases every party holds, and which each party lacks.

    Args:
        party_keys: party name -> that party's case keys (any number of parties).

    Returns:
        a :class:`CaseMatch`.

    Raises:
        ValueError: no parties.
        SplitUNetDataError: a party lists the same key twice (two of its case IDs would be indistinguishable).
    """
    if not party_keys:
        raise ValueError("match_case_keys needs at least one party")
    sets: dict[str, set[str]] = {}
    for party, keys in party_keys.items():
        keys = list(keys)
        unique = set(keys)
        if len(unique) != len(keys):
            seen: set[str] = set()
            dup = sorted({k for k in keys if k in seen or seen.add(k)})
            raise SplitUNetDataError(f"case keys listed more than once: {', '.join(dup)}", party=party)
        sets[party] = unique
    everywhere = set.intersection(*sets.values())
    anywhere = set.union(*sets.values())
    missing = {party: sorted(anywhere - keys) for party, keys in sets.items() if anywhere - keys}
    return CaseMatch(common=sorted(everywhere), missing=missing)


def read_or_create_secret(path: str | Path) -> str:
    """The data holders' shared secret for case keys, kept in ``path`` (created random if absent).

    For simulator and demo workspaces only: a real consortium agrees on the secret out of band and each data
    holder writes it into its own settings file.
    """
    path = Path(path)
    if not path.is_file():
        write_text_atomic(secrets.token_hex(16), path, mode=0o600)  # readable by its owner only
    return path.read_text().strip()


# Characters that end a path in a message (a path's own characters are anything else but white space).
_PATH_END = r"\s'\"<>,;:()\[\]{}"


def _path_variants(folder: str | os.PathLike) -> set[str]:
    """A folder as configured and as resolved (symbolic links, ``..``), without a trailing separator."""
    text = os.fspath(folder)
    variants = {text}
    try:
        variants.add(str(Path(text).expanduser().resolve()))
    except (OSError, RuntimeError):
        pass  # an unresolvable path is still replaced as written
    return {variant.rstrip("/\\") for variant in variants if variant.rstrip("/\\")}


def scrub_private(
    text: str,
    case_keys: Mapping[str, str] | None = None,
    private_dirs: Iterable[tuple[str, str | os.PathLike]] = (),
) -> str:
    """``text`` without a party's private names: what may leave the party.

    Each path in or under a private folder becomes ``<name>`` (the whole path: file names under a data folder
    are case IDs), deepest folders first; then each case ID becomes ``<case key K>``, longest IDs first so that
    an ID within another is not half replaced.

    Args:
        text: a message (an error, a log line).
        case_keys: case ID -> its key.
        private_dirs: ``(name to show, folder)`` pairs, e.g. ``("data_dir", "/data/flair")``: paths in or under
            the folder must not leave.

    Returns:
        the scrubbed text.
    """
    variants = [(variant, name) for name, folder in private_dirs for variant in _path_variants(folder)]
    for variant, name in sorted(variants, key=lambda pair: len(pair[0]), reverse=True):
        # The folder itself or anything under it; not a sibling that merely starts alike (/data/flair2).
        pattern = re.escape(variant) + rf"(?:[/\\][^{_PATH_END}]*)?(?![^{_PATH_END}])"
        text = re.sub(pattern, f"<{name}>", text)
    ids = sorted((case for case in (case_keys or {}) if case), key=len, reverse=True)
    if ids:
        # One pass, so that a replaced key is never searched again for another ID.
        pattern = re.compile("|".join(re.escape(case) for case in ids))
        text = pattern.sub(lambda match: f"<case key {case_keys[match.group(0)]}>", text)
    return text


class PrivateNames:
    """What a data holder keeps to itself in messages: its case IDs (shown by key) and its data folders.

    A party fills it in as it learns them (secret, folders, then the case IDs it lists) and scrubs every message
    that leaves it; what is not known yet is not replaced.
    """

    def __init__(self):
        self.secret: str | None = None
        self.case_keys: dict[str, str] = {}
        self.dirs: list[tuple[str, str]] = []

    def use_secret(self, secret: str) -> None:
        """The case-key secret; keys are computed with it from now on."""
        self.secret = secret

    def add_dir(self, name: str, folder: str | os.PathLike | None) -> None:
        """A private folder, shown as ``<name>``."""
        if folder is not None and (name, os.fspath(folder)) not in self.dirs:
            self.dirs.append((name, os.fspath(folder)))

    def add_cases(self, case_ids: Iterable[str]) -> None:
        """Case IDs to replace by their keys (needs the secret)."""
        for case in case_ids:
            self.key(case)

    def key(self, case_id: str | None) -> str | None:
        """The key of a case ID (remembered for scrubbing), or ``None`` without a secret or ID."""
        if not case_id or not self.secret:
            return None
        if case_id not in self.case_keys:
            self.case_keys[case_id] = case_key(case_id, self.secret)
        return self.case_keys[case_id]

    def scrub(self, text: str) -> str:
        """:func:`scrub_private` with everything known so far."""
        return scrub_private(text, self.case_keys, self.dirs)
