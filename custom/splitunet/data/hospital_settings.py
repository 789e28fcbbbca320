"""Where a hospital's cases live: its entry in the same site-local settings file the split jobs read.

A hospital (of the horizontal FedAvg baseline or of the U-shaped split) finds its entry in
``$SPLITUNET_SITE_CONFIG`` or ``<its FLARE workspace>/local/splitunet_site.json``
(:func:`splitunet.data.party_settings.find_settings_file`), under its own name, so one job folder serves any
consortium. The entry names the hospital's dataset folder with ``hospital_dir``, a key of its own, so that one
institution's entry may also hold a modality site's ``data_dir`` for the split jobs::

    {
      "parties": {
        "hospital-a": {"hospital_dir": "/data/hospital_a/Task01_BrainTumour", "layout": "msd",
                       "checkpoint_dir": "/data/splitunet/checkpoints"}
      }
    }

``layout`` is one of ``splitunet.data.layouts.SOURCE_LAYOUTS`` (default ``"msd"``). ``checkpoint_dir`` is optional
(the U-shape's hospitals keep their head and tail there; without it, in the job's run folder). Relative paths are
resolved against the folder of the settings file. No case-key secret is needed: a hospital's cases never leave it,
not even by key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from splitunet.data.layouts import SOURCE_LAYOUTS
from splitunet.data.party_settings import find_settings_file
from splitunet.errors import SplitUNetConfigError

__all__ = ["HOSPITAL_DIR_KEY", "HospitalSettings", "load_hospital_settings"]

HOSPITAL_DIR_KEY = "hospital_dir"


@dataclass(frozen=True)
class HospitalSettings:
    """A hospital's local settings.

    Attributes:
        party: the hospital's name.
        data_dir: its dataset folder (the entry's ``hospital_dir``).
        layout: the dataset's layout (files and label numbering).
        source: the settings file they were read from.
        checkpoint_dir: where it keeps checkpoints that outlive the job, if it names a folder.
    """

    party: str
    data_dir: Path
    layout: str
    source: Path
    checkpoint_dir: Path | None = None


def _folder(settings_file: Path, value: str) -> Path:
    """``value`` as a path, relative ones against the settings file's folder (where the operator wrote them)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (settings_file.parent / path).resolve()


def load_hospital_settings(party: str, site_config_dir: str | os.PathLike | None) -> HospitalSettings:
    """Read a hospital's entry.

    Args:
        party: the hospital's name (its FLARE client name).
        site_config_dir: its ``local/`` folder (ignored when ``$SPLITUNET_SITE_CONFIG`` is set).

    Returns:
        the entry, with its folders resolved.

    Raises:
        SplitUNetConfigError: no settings file, a file that is not JSON, no entry for ``party``, no
            ``hospital_dir``, an unknown layout, or a ``checkpoint_dir`` that is not a path; the message names the
            file and the party.
    """
    path = find_settings_file(site_config_dir)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SplitUNetConfigError(f"{path} is not readable JSON: {error}") from error
    parties = content.get("parties") if isinstance(content, dict) else None
    if not isinstance(parties, dict):
        raise SplitUNetConfigError(f"{path} must hold an object with a 'parties' mapping")
    entry = parties.get(party)
    if not isinstance(entry, dict):
        raise SplitUNetConfigError(f"{path} has no entry for hospital {party!r} (has: {sorted(parties)})")
    folder = entry.get(HOSPITAL_DIR_KEY)
    if not isinstance(folder, str) or not folder:
        raise SplitUNetConfigError(
            f"{path}: hospital {party!r} needs {HOSPITAL_DIR_KEY!r}, the folder of its own cases with every modality "
            "and the labels"
        )
    layout = entry.get("layout", "msd")
    if layout not in SOURCE_LAYOUTS:
        raise SplitUNetConfigError(
            f"{path}: hospital {party!r} has layout {layout!r}; expected one of {SOURCE_LAYOUTS}"
        )
    checkpoints = entry.get("checkpoint_dir")
    if checkpoints is not None and (not isinstance(checkpoints, str) or not checkpoints):
        raise SplitUNetConfigError(
            f"{path}: hospital {party!r} has checkpoint_dir {checkpoints!r}; expected a folder path (or no key)"
        )
    return HospitalSettings(
        party=party,
        data_dir=_folder(path, folder),
        layout=layout,
        source=path,
        checkpoint_dir=None if checkpoints is None else _folder(path, checkpoints),
    )
