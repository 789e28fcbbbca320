"""One entry of a site's own ``local/privacy.json``, the file FLARE reads for the site's privacy scopes.

The bundle keeps a site's own rules beside FLARE's scopes in that file, under keys FLARE ignores: the minimum defense,
the epsilon cap and whether the encoder may leave. Each rule reads its key with :func:`policy_entry`, so a missing
file, an unreadable one and a missing key mean the same everywhere. Plain Python, no FLARE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from splitunet.errors import SplitUNetConfigError

__all__ = ["PRIVACY_FILE", "ABSENT", "policy_entry"]

PRIVACY_FILE = "privacy.json"
# What policy_entry returns for a file or key that is not there (``None`` is a value a site may have written).
ABSENT = object()


def policy_entry(privacy_file: str | Path, key: str) -> object:
    """The value ``key`` holds in ``privacy_file``, or :data:`ABSENT` when the file, or the key in it, is absent.

    Raises:
        SplitUNetConfigError: the file cannot be read or is not JSON (the message names ``local/<file>``, no path).
    """
    path = Path(privacy_file)
    if not path.is_file():
        return ABSENT
    try:
        policy = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SplitUNetConfigError(f"local/{path.name} cannot be read: {error}") from error
    if not isinstance(policy, Mapping) or key not in policy:
        return ABSENT
    return policy[key]
