"""Opt-in recording of the features the server receives (and the gradients it sends), for leakage evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from splitunet.checkpoint import save_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.filters.base import FeatureFilter
from splitunet.flare.workspace_paths import run_dir
from splitunet.wire.codec import ENCODING_META_KEY, decode_entry
from splitunet.wire.protocol import MetaKey

__all__ = ["CaptureFeatures"]


class CaptureFeatures(FeatureFilter):
    """Save the features crossing the server, as they are there, to the server's run folder.

    Put it last in the server's ``task_result_filters`` to record activations as received (after every site
    filter: what an honest-but-curious server really holds), and last in its ``task_data_filters`` to record the
    gradients as sent (after the server's gradient defenses: what a curious site really receives). Files go to
    ``<run folder>/captures/<data kind>/<site>/iteration_<n>.pt`` with the dense tensors (wire encodings decoded),
    the crop plan the site echoed, and the filter trail. They are what the attacks of ``splitunet leakage`` read.

    Off unless configured. Captured activations are as sensitive as the activations themselves: the filter says
    so in the log at its first capture, and only captures training iterations listed (or every ``every``-th).

    Args:
        iterations: training iterations to capture.
        every: also capture every this many iterations (0: only ``iterations``).
        max_captures: stop capturing after this many files (bounds disk use).
        folder: sub-folder of the run folder.
        data_kinds: kinds to capture (default activations and gradients).
    """

    accepts_encoded = True
    stateful = True  # its capture budget

    def __init__(
        self,
        iterations: Iterable[int] = (1,),
        every: int = 0,
        max_captures: int = 200,
        folder: str = "captures",
        data_kinds: Sequence[str] | None = None,
    ):
        # Captures are logged one by one below; the per-call line would only repeat "not captured".
        super().__init__(levels=None, data_kinds=data_kinds, log_every=1000)
        self.iterations = {int(i) for i in iterations}
        if not isinstance(every, int) or every < 0:
            raise SplitUNetConfigError(f"CaptureFeatures: every must be an int >= 0, got {every!r}")
        if not isinstance(max_captures, int) or max_captures < 1:
            raise SplitUNetConfigError(f"CaptureFeatures: max_captures must be an int >= 1, got {max_captures!r}")
        if not self.iterations and not every:
            raise SplitUNetConfigError("CaptureFeatures: give iterations or every, or leave the filter out")
        self.every = every
        self.max_captures = max_captures
        self.folder = folder
        self.captured = 0

    def wants(self, iteration) -> bool:
        """Whether a DXO of this training iteration is captured (inference windows carry no iteration)."""
        if iteration is None or self.captured >= self.max_captures:
            return False
        return int(iteration) in self.iterations or bool(self.every and int(iteration) % self.every == 0)

    def filter_features(self, features: dict[str, torch.Tensor], dxo: DXO, fl_ctx: FLContext):
        iteration = dxo.get_meta_prop(MetaKey.ITERATION)
        if not self.wants(iteration):
            return dict(features), {}, "not a capture iteration"
        peer_ctx = fl_ctx.get_peer_context()
        site = peer_ctx.get_identity_name() if peer_ctx is not None else "unknown"
        encodings = dxo.get_meta_prop(ENCODING_META_KEY) or {}
        dense = {key: decode_entry(value, encodings.get(key)).clone() for key, value in features.items()}
        path = Path(run_dir(fl_ctx)) / self.folder / dxo.data_kind / site / f"iteration_{int(iteration):06d}.pt"
        record = {
            "features": dense,
            "data_kind": dxo.data_kind,
            "site": site,
            "iteration": int(iteration),
            "plan": dxo.get_meta_prop(MetaKey.PLAN),
            "filter_trail": dxo.get_meta_prop(MetaKey.FILTER_TRAIL) or [],
        }
        save_checkpoint(record, path)
        self.captured += 1
        if self.captured == 1:
            self.log_warning(
                fl_ctx,
                f"CaptureFeatures is ON: saving {dxo.data_kind} crossing this server to {path.parent.parent} for "
                f"leakage evaluation; these files are as sensitive as the features themselves",
            )
        self.log_info(fl_ctx, f"CaptureFeatures: captured {dxo.data_kind} {sorted(dense)} of {site} to {path}")
        return dict(features), {}, f"captured {sorted(dense)} to {path}"
