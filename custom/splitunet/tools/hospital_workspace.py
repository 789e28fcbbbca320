"""A simulator workspace's ``local/`` for hospitals that hold whole cases (the FedAvg baseline and the U-shape).

Both runners (:mod:`splitunet.horizontal.demo`, :mod:`splitunet.u_shape.demo`) write the same content: each
hospital's entry of :mod:`splitunet.data.hospital_settings` and the bundle's allow-list, which names both
topologies' classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.data.hospital_settings import HOSPITAL_DIR_KEY
from splitunet.data.party_settings import SETTINGS_FILE_NAME
from splitunet.tools.deployment import allow_splitunet_classes

__all__ = ["prepare_hospital_workspace"]


def prepare_hospital_workspace(
    workspace: str | Path, hospital_dirs: Mapping[str, str | Path], layout: str = "msd"
) -> Path:
    """Write ``<workspace>/local`` for ``nvflare simulator``: each hospital's ``hospital_dir`` and the allow-list.

    The simulator copies ``local/`` into every party, so one settings file names every hospital's folder.

    Args:
        workspace: the simulator workspace.
        hospital_dirs: each hospital's dataset folder, by its client name.
        layout: the datasets' layout (one of ``splitunet.data.layouts.SOURCE_LAYOUTS``).

    Returns:
        the workspace, resolved.
    """
    workspace = Path(workspace).resolve()
    local_dir = workspace / "local"
    local_dir.mkdir(parents=True, exist_ok=True)
    parties = {
        name: {HOSPITAL_DIR_KEY: str(Path(folder).resolve()), "layout": layout}
        for name, folder in hospital_dirs.items()
    }
    write_json_atomic({"parties": parties}, local_dir / SETTINGS_FILE_NAME)
    allow_splitunet_classes(local_dir)
    return workspace
