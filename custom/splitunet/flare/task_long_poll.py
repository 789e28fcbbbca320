"""Let a site's task request wait at the server for its next task instead of coming back later.

A FLARE site asks the server for work; when none is scheduled it is told to try again and sleeps before asking
once more: ``default_task_fetch_interval`` / ``task_request_interval`` in POC and real deployments, but a fixed
0.5 s in the simulator's site workers (nvflare 2.9 ``simulator_worker.py``). A split step schedules one task per
site only after the server's decoder step, so a site that asked a moment too early starts its part of the next
step up to that long after the others, and the whole step waits for it.

``ServerRunner._try_to_get_task`` can already wait: it retries the workflow every ``retry_interval`` until
``timeout``, taking and releasing the runner's workflow lock each time, but nvflare 2.9 calls it without a timeout.
:func:`enable_task_long_poll` gives it one for the life of a workflow. Each waiting site holds one of the server's
request threads for at most ``timeout_s``, so the timeout must stay well below the sites' task-request timeout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

__all__ = ["enable_task_long_poll"]

# The server runner's method that asks the current workflow for a site's task (nvflare 2.9).
_GET_TASK = "_try_to_get_task"


def enable_task_long_poll(fl_ctx: FLContext, timeout_s: float, retry_s: float) -> Callable[[], None] | None:
    """Make the server runner wait up to ``timeout_s`` for a site's next task before answering "try again".

    Args:
        fl_ctx: the workflow's context (its ``RUNNER`` is the server runner).
        timeout_s: longest wait of one task request, in seconds.
        retry_s: how often the waiting request asks the workflow again.

    Returns:
        a function that restores the runner's own behaviour, or ``None`` when this FLARE has no such method (then
        nothing changed and sites simply poll).
    """
    runner = fl_ctx.get_prop(FLContextKey.RUNNER)
    original = getattr(runner, _GET_TASK, None)
    if original is None:
        return None
    setattr(runner, _GET_TASK, functools.partial(original, timeout=timeout_s, retry_interval=retry_s))

    def restore() -> None:
        # The bound method lives on the class; dropping the instance attribute brings it back.
        if getattr(runner, _GET_TASK, None) is not original:
            runner.__dict__.pop(_GET_TASK, None)

    return restore
