"""Opt-in recording of the encoder weights the server receives and sends when it averages them, for leakage evaluation.

:class:`~splitunet.filters.CaptureFeatures` records activations and gradients; it is a
:class:`~splitunet.filters.FeatureFilter`, whose checks accept feature levels only, so it cannot take FLARE
``WEIGHTS`` DXOs (parameter names, not levels) without widening the validation every privacy filter relies on. This
sibling records the ``WEIGHTS`` DXOs of ``split_average`` instead: what each site uploads (the server's result
chain) and the average the server sends it back (its data chain), in the same ``captures/`` folder.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from splitunet.checkpoint import save_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.flare.workspace_paths import run_dir
from splitunet.wire.protocol import MetaKey

__all__ = ["CaptureWeights", "RECEIVED", "SENT", "WEIGHTS_FOLDER", "weights_capture_path"]

# Sub-folder of the captures folder, and its two directions as the server sees them.
WEIGHTS_FOLDER = "weights"
RECEIVED = "received"  # a site's encoder copy, as it arrived (after every filter of the site and of the server)
SENT = "sent"  # the average the server sends the site, as it leaves (after every filter of the server)
_DIRECTIONS = {FilterKey.IN: RECEIVED, FilterKey.OUT: SENT}


def weights_capture_path(captures_dir: str | Path, direction: str, site: str, iteration: int) -> Path:
    """``<captures>/weights/<received|sent>/<site>/iteration_<n>.pt``: where :class:`CaptureWeights` files a record."""
    if direction not in (RECEIVED, SENT):
        raise ValueError(f"direction must be {RECEIVED!r} or {SENT!r}, got {direction!r}")
    return Path(captures_dir) / WEIGHTS_FOLDER / direction / site / f"iteration_{int(iteration):06d}.pt"


class CaptureWeights(DXOFilter):
    """Save the ``WEIGHTS`` DXOs crossing the server, as they are there, to the server's run folder.

    Put it last in the server's ``task_result_filters`` of ``split_average`` to record each site's encoder copy as
    received, and last in its ``task_data_filters`` of that task to record the average as sent (the direction comes
    from FLARE's filter context). Each file (:func:`weights_capture_path`) holds ``{"weights": name -> tensor (the
    array's dtype kept), "direction", "site", "iteration", "meta"}``; the data pass on unchanged.

    Off unless configured, and allowed only in an evaluation workspace: a captured copy is the site's encoder
    itself. The filter says so in the log at its first capture.

    Args:
        iterations: training iterations whose averaging is captured (``None``: every averaging; there is one every
            ``encoder_averaging_every`` iterations).
        max_captures: stop capturing after this many files (bounds disk use).
        folder: sub-folder of the run folder (the captures folder :class:`CaptureFeatures` writes to by default).
    """

    def __init__(self, iterations: Iterable[int] | None = None, max_captures: int = 400, folder: str = "captures"):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        try:
            self.iterations = None if iterations is None else {int(i) for i in iterations}
        except (TypeError, ValueError):
            message = f"CaptureWeights: iterations must be a list of ints, got {iterations!r}"
            raise SplitUNetConfigError(message) from None
        if isinstance(max_captures, bool) or not isinstance(max_captures, int) or max_captures < 1:
            raise SplitUNetConfigError(f"CaptureWeights: max_captures must be an int >= 1, got {max_captures!r}")
        self.max_captures = max_captures
        self.folder = folder
        self.captured = 0
        # FLARE runs the server's data filters concurrently, one thread per site: the capture budget is shared.
        self._lock = threading.Lock()

    def wants(self, iteration) -> bool:
        """Whether a ``WEIGHTS`` DXO of this averaging iteration is captured."""
        if iteration is None or self.captured >= self.max_captures:
            return False
        return self.iterations is None or int(iteration) in self.iterations

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> None:
        direction = _DIRECTIONS.get(fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION))
        if direction is None:
            raise RuntimeError("CaptureWeights runs only in a FLARE filter chain, which says the data's direction")
        iteration = dxo.get_meta_prop(MetaKey.ITERATION)
        with self._lock:
            if not self.wants(iteration):
                return None
            self.captured += 1
            first = self.captured == 1
        peer_ctx = fl_ctx.get_peer_context()
        site = peer_ctx.get_identity_name() if peer_ctx is not None else "unknown"
        weights = {}
        for name, value in (dxo.data or {}).items():
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            weights[str(name)] = torch.from_numpy(np.array(array, copy=True))
        path = weights_capture_path(Path(run_dir(fl_ctx)) / self.folder, direction, site, iteration)
        meta = {key: value for key, value in (dxo.meta or {}).items() if isinstance(value, (int, float, str, bool))}
        save_checkpoint(
            {"weights": weights, "direction": direction, "site": site, "iteration": int(iteration), "meta": meta}, path
        )
        if first:
            self.log_warning(
                fl_ctx,
                f"CaptureWeights is ON: saving the encoder weights crossing this server to {path.parents[2]} for "
                "leakage evaluation; each file is a site's encoder",
                fire_event=fl_ctx.get_engine() is not None,  # outside FLARE (tests) there is nowhere to fire it
            )
        self.log_info(fl_ctx, f"CaptureWeights: captured the {direction} weights of {site} to {path}")
        return None  # recorded, not changed
