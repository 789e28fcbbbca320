"""Opt-in audit of what crosses a party: one digest per task payload, in both directions, kept at that party."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from splitunet.errors import SplitUNetConfigError
from splitunet.flare.workspace_paths import run_dir
from splitunet.wire.transport import register_tensor_support

__all__ = ["WireAudit", "AUDIT_FILE_PREFIX", "tensor_digest"]

AUDIT_FILE_PREFIX = "wire_"


def tensor_digest(tensor: torch.Tensor) -> dict:
    """Shape, dtype, bytes and SHA-256 of a tensor's contents: enough to match a sent tensor with a received one
    and to show its size and type to an auditor, without keeping the tensor."""
    data = tensor.detach().contiguous().cpu()
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return {
        "shape": list(data.shape),
        "dtype": str(data.dtype).removeprefix("torch."),
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


class WireAudit(Filter):
    """Append a digest of every task payload to ``<run folder>/<folder>/wire_<party>.jsonl``.

    Put it last in a party's outgoing chain (site ``task_result_filters``, server ``task_data_filters``) to record
    what really leaves after every defense, and first in its incoming chain (site ``task_data_filters``, server
    ``task_result_filters``) to record what really arrived. With both ends audited, each party holds its own
    record of everything it sent and received: task name, direction, peer, DXO kind, every entry's shape, dtype,
    bytes and SHA-256, and the meta (crop plans, keyed case hashes, filter trail). An ethics board can read
    these files, match the digests across parties, and check that no image, label, weight or case ID crossed.

    Tensors are never stored, only digests; the meta is stored as sent. The payload passes on unchanged.

    Args:
        folder: sub-folder of the party's run folder.
    """

    def __init__(self, folder: str = "audit"):
        super().__init__()
        if not isinstance(folder, str) or not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise SplitUNetConfigError(f"WireAudit: folder must be a relative sub-folder name, got {folder!r}")
        self.folder = folder
        self._lock = threading.Lock()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        register_tensor_support()
        me = fl_ctx.get_identity_name() or "?"
        peer_ctx = fl_ctx.get_peer_context()
        direction = "in" if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN else "out"
        record = {
            "party": me,
            "peer": peer_ctx.get_identity_name() if peer_ctx is not None else None,
            "direction": direction,
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "return_code": shareable.get_return_code(),
        }
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - an error reply or a non-DXO payload: record that much
            record["kind"] = None
        else:
            record["kind"] = dxo.data_kind
            record["entries"] = {
                key: tensor_digest(value) if isinstance(value, torch.Tensor) else {"type": type(value).__name__}
                for key, value in sorted((dxo.data or {}).items())
            }
            record["meta"] = dxo.meta or {}
        path = Path(run_dir(fl_ctx)) / self.folder / f"{AUDIT_FILE_PREFIX}{me}.jsonl"
        line = json.dumps(record, default=str, sort_keys=True) + "\n"
        with self._lock:  # one file per party; a party may filter several tasks at once
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(line)
        return shareable
