"""A test-only FLARE filter that makes one site misbehave at one training iteration (copied into a job's custom/).

``mode="stall"`` holds the site's reply for ``seconds`` (a site that stops answering: VPN drop, hung GPU);
``mode="crash"`` raises in the filter, so the site's reply is an error. It sits in the site's result chain of
``split_step`` and reads the iteration the site echoes in its reply.
"""

from __future__ import annotations

import time

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

FAULT_MODES = ("stall", "crash")


class SiteFault(Filter):
    """Misbehave at ``site`` when it answers the step of ``iteration``.

    Args:
        site: the party that misbehaves.
        iteration: the training iteration whose reply is held back or broken.
        mode: ``"stall"`` or ``"crash"``.
        seconds: how long a stall lasts.
    """

    def __init__(self, site: str, iteration: int, mode: str = "stall", seconds: float = 30.0):
        super().__init__()
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {FAULT_MODES}, got {mode!r}")
        self.site, self.iteration, self.mode, self.seconds = site, int(iteration), mode, float(seconds)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_identity_name() != self.site:
            return shareable
        if from_shareable(shareable).get_meta_prop("iteration") != self.iteration:
            return shareable
        if self.mode == "crash":
            raise RuntimeError(f"injected fault at {self.site}, iteration {self.iteration}")
        self.log_warning(fl_ctx, f"injected stall of {self.seconds}s at {self.site}, iteration {self.iteration}")
        time.sleep(self.seconds)
        return shareable
