"""The filters a job's own config puts on a task, rebuilt from the config the way FLARE builds them.

A party sometimes needs to know what its filters will do before it makes the payload: a sender whose chain starts
by quantizing can make the codes on its device (:func:`~splitunet.filters.quantize_features.sender_encoding_bits`),
and a site checks the chain against its minimum defense. FLARE keeps the live filter objects private to its runners,
so the chain is read from the job's config file in the party's workspace.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from nvflare.apis.fl_context import FLContext
from nvflare.fuel.utils.class_utils import load_class

from splitunet.filters.quantize_features import common_sender_bits

__all__ = ["SERVER_CONFIG", "CLIENT_CONFIG", "job_config", "config_chain", "sender_wire_bits"]

SERVER_CONFIG = "config_fed_server.json"
CLIENT_CONFIG = "config_fed_client.json"


def job_config(fl_ctx: FLContext, file_name: str) -> dict:
    """This party's copy of the job's config ``file_name`` (empty when the job has none)."""
    workspace = fl_ctx.get_engine().get_workspace()
    path = Path(workspace.get_app_config_dir(fl_ctx.get_job_id())) / file_name
    return json.loads(path.read_text()) if path.is_file() else {}


def config_chain(config: dict, section: str, task: str) -> list:
    """New instances of the filters that ``config[section]`` (``task_data_filters`` or ``task_result_filters``)
    puts on ``task``, in order."""
    filters = []
    for chain in config.get(section, []):
        if task in chain.get("tasks", []) or "*" in chain.get("tasks", []):
            for entry in chain.get("filters", []):
                filters.append(load_class(entry["path"])(**entry.get("args", {})))
    return filters


def sender_wire_bits(
    fl_ctx: FLContext, file_name: str, section: str, tasks: Sequence[str], data_kind: str
) -> int | None:
    """Bits to which this party may quantize what it sends on ``tasks`` on its device: those of the quantizer that
    starts every one of their chains (:func:`~splitunet.filters.quantize_features.sender_encoding_bits`), else
    ``None`` (it sends dense tensors and the filters do what they do)."""
    config = job_config(fl_ctx, file_name)
    return common_sender_bits([config_chain(config, section, task) for task in tasks], data_kind)
