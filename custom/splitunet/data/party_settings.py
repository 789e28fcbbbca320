"""Where each party's data lives: a site-local setting, never a path baked into the job.

A party (site or server) finds its settings in a JSON file named by the environment variable
``SPLITUNET_SITE_CONFIG``, or else in ``<its FLARE workspace>/local/splitunet_site.json``. The file maps party
names to their settings, so one file can serve every party of a simulator workspace while a real institution's
file holds only its own entry::

    {
      "case_key_secret": "agreed among data holders, never sent",
      "parties": {
        "site-1": {"modality": "flair", "data_dir": "/data/brats/flair",
                   "checkpoint_dir": "/data/splitunet/checkpoints"},
        "server": {"labels_dir": "/data/brats/labels", "layout": "msd"}
      }
    }

Relative paths are resolved against the folder of the settings file. ``checkpoint_dir`` is optional: without it
a party writes its checkpoints into the job's run folder, which a new job (or a new simulator run, which wipes
its workspace) does not see, so a run can be resumed only from a party that names one. A site may also set
``encoder_seed`` (an int it keeps to itself) so that the server cannot rebuild its encoder's initial weights, and
``inference_dir``, the folder of new cases the inference job reads (default ``data_dir``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from splitunet.errors import SplitUNetConfigError
from splitunet.wire.protocol import MODALITIES

__all__ = [
    "SETTINGS_ENV_VAR",
    "SETTINGS_FILE_NAME",
    "SERVER_PARTY",
    "SiteSettings",
    "ServerSettings",
    "find_settings_file",
    "load_site_settings",
    "load_server_settings",
    "write_settings",
]

SETTINGS_ENV_VAR = "SPLITUNET_SITE_CONFIG"
SETTINGS_FILE_NAME = "splitunet_site.json"
# The label holder's entry; FLARE calls the server "server" in POC/provisioned mode and "simulator_server" in the
# simulator, so the server looks up its own name first and then this one.
SERVER_PARTY = "server"


@dataclass(frozen=True)
class SiteSettings:
    """A modality site's local settings."""

    party: str
    modality: str
    data_dir: Path
    case_key_secret: str
    source: Path
    checkpoint_dir: Path | None = None
    encoder_seed: int | None = None
    inference_dir: Path | None = None


@dataclass(frozen=True)
class ServerSettings:
    """The label holder's local settings."""

    party: str
    labels_dir: Path | None
    layout: str
    case_key_secret: str
    source: Path
    checkpoint_dir: Path | None = None


def find_settings_file(site_config_dir: str | os.PathLike | None) -> Path:
    """Return the settings file: ``$SPLITUNET_SITE_CONFIG`` if set, else ``<site_config_dir>/splitunet_site.json``."""
    env_path = os.environ.get(SETTINGS_ENV_VAR)
    if env_path:
        path = Path(env_path)
        if not path.is_file():
            raise SplitUNetConfigError(f"{SETTINGS_ENV_VAR}={env_path} does not name a file")
        return path
    if site_config_dir is None:
        raise SplitUNetConfigError(f"no site settings: set {SETTINGS_ENV_VAR} or create local/{SETTINGS_FILE_NAME}")
    path = Path(site_config_dir) / SETTINGS_FILE_NAME
    if not path.is_file():
        raise SplitUNetConfigError(
            f"no site settings at {path}: write it (see docs/configuration.md) or set {SETTINGS_ENV_VAR}"
        )
    return path


def _read(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except json.JSONDecodeError as error:
        raise SplitUNetConfigError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("parties"), dict):
        raise SplitUNetConfigError(f"{path} must hold an object with a 'parties' mapping")
    return content


def _entry(content: dict, path: Path, names: tuple[str, ...]) -> tuple[str, dict]:
    for name in names:
        if name in content["parties"]:
            return name, content["parties"][name]
    raise SplitUNetConfigError(f"{path} has no entry for party {names[0]!r} (has: {sorted(content['parties'])})")


def _secret(content: dict, entry: dict, path: Path, party: str) -> str:
    secret = entry.get("case_key_secret", content.get("case_key_secret"))
    if not isinstance(secret, str) or not secret:
        raise SplitUNetConfigError(f"{path}: party {party!r} needs a non-empty 'case_key_secret'")
    return secret


def _resolve(path: Path, value, key: str, party: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SplitUNetConfigError(f"{path}: party {party!r} needs {key!r}")
    resolved = Path(value).expanduser()
    return resolved if resolved.is_absolute() else (path.parent / resolved).resolve()


def _optional_seed(path: Path, entry: dict, party: str) -> int | None:
    seed = entry.get("encoder_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise SplitUNetConfigError(f"{path}: party {party!r} has encoder_seed {seed!r}; expected an int >= 0")
    return seed


def _optional_dir(path: Path, entry: dict, key: str, party: str) -> Path | None:
    return None if entry.get(key) is None else _resolve(path, entry[key], key, party)


def load_site_settings(party: str, site_config_dir: str | os.PathLike | None) -> SiteSettings:
    """Read a modality site's settings (its modality and data folder)."""
    path = find_settings_file(site_config_dir)
    content = _read(path)
    name, entry = _entry(content, path, (party,))
    modality = entry.get("modality")
    if modality not in MODALITIES:
        raise SplitUNetConfigError(f"{path}: party {name!r} has modality {modality!r}; expected one of {MODALITIES}")
    return SiteSettings(
        party=name,
        modality=modality,
        data_dir=_resolve(path, entry.get("data_dir"), "data_dir", name),
        case_key_secret=_secret(content, entry, path, name),
        source=path,
        checkpoint_dir=_optional_dir(path, entry, "checkpoint_dir", name),
        encoder_seed=_optional_seed(path, entry, name),
        inference_dir=_optional_dir(path, entry, "inference_dir", name),
    )


def load_server_settings(party: str, site_config_dir: str | os.PathLike | None) -> ServerSettings:
    """Read the label holder's settings (labels folder and label layout; an inference-only server has no labels)."""
    path = find_settings_file(site_config_dir)
    content = _read(path)
    name, entry = _entry(content, path, (party, SERVER_PARTY))
    return ServerSettings(
        party=name,
        labels_dir=_optional_dir(path, entry, "labels_dir", name),
        layout=str(entry.get("layout", "msd")),
        case_key_secret=_secret(content, entry, path, name),
        source=path,
        checkpoint_dir=_optional_dir(path, entry, "checkpoint_dir", name),
    )


def write_settings(path: str | os.PathLike, parties: dict[str, dict], case_key_secret: str) -> Path:
    """Write a settings file (used by ``splitunet prepare`` and the demo)."""
    from splitunet.atomic_files import write_json_atomic

    return write_json_atomic({"case_key_secret": case_key_secret, "parties": parties}, path)
