"""Where a hospital's data lives: its own entry in the party settings file the split job reads.

The file is found as for every party (``$SPLITUNET_SITE_CONFIG``, else ``<FLARE workspace>/local/splitunet_site.json``;
see :mod:`splitunet.data.party_settings`). A hospital's entry names a whole dataset instead of a modality::

    {"parties": {"hospital-a": {"data_dir": "/data/Task01_BrainTumour", "layout": "msd",
                                "checkpoint_dir": "/data/splitunet/checkpoints"}}}

Relative paths are resolved against the settings file's folder. ``layout`` defaults to ``"msd"``. No case-key
secret is needed: the server of the U-shaped job never hears of a case.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from splitunet.data.layouts import SOURCE_LAYOUTS
from splitunet.data.party_settings import find_settings_file
from splitunet.errors import SplitUNetConfigError

__all__ = ["HospitalSettings", "load_hospital_settings"]


@dataclass(frozen=True)
class HospitalSettings:
    """A hospital's local settings."""

    party: str
    data_dir: Path
    layout: str
    source: Path
    checkpoint_dir: Path | None = None


def _path(settings_file: Path, value, key: str, party: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SplitUNetConfigError(f"{settings_file}: party {party!r} needs {key!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (settings_file.parent / path).resolve()


def load_hospital_settings(party: str, site_config_dir: str | os.PathLike | None) -> HospitalSettings:
    """Read a hospital's entry.

    Raises:
        SplitUNetConfigError: no settings file, no entry for ``party``, no ``data_dir``, an unknown layout.
    """
    path = find_settings_file(site_config_dir)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SplitUNetConfigError(f"{path} is not valid JSON: {error}") from error
    parties = content.get("parties") if isinstance(content, dict) else None
    if not isinstance(parties, dict) or not isinstance(parties.get(party), dict):
        known = sorted(parties) if isinstance(parties, dict) else []
        raise SplitUNetConfigError(f"{path} has no entry for party {party!r} (has: {known})")
    entry = parties[party]
    layout = entry.get("layout", "msd")
    if layout not in SOURCE_LAYOUTS:
        raise SplitUNetConfigError(f"{path}: party {party!r} has layout {layout!r}; expected one of {SOURCE_LAYOUTS}")
    checkpoint_dir = entry.get("checkpoint_dir")
    return HospitalSettings(
        party=party,
        data_dir=_path(path, entry.get("data_dir"), "data_dir", party),
        layout=layout,
        source=path,
        checkpoint_dir=None if checkpoint_dir is None else _path(path, checkpoint_dir, "checkpoint_dir", party),
    )
