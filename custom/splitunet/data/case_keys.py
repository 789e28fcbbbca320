"""Keyed case hashes: how parties agree on shared cases without sending patient IDs.

The data holders share a secret out of band; each turns its case IDs into ``HMAC-SHA256(secret, case_id)`` keys
and sends only the keys. Without the secret, a key cannot be checked against a guessed patient ID (which a plain
hash would allow).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from splitunet.atomic_files import write_text_atomic
from splitunet.errors import SplitUNetDataError

__all__ = ["KEY_LENGTH", "case_key", "keys_to_case_ids", "CaseMatch", "match_case_keys", "read_or_create_secret"]

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
