"""Let a site's task request wait at the server for its next task instead of coming back later.

A FLARE site asks the server for work; when none is scheduled it is told to try again and sleeps before asking
once more: ``default_task_fetch_interval`` / ``task_request_interval`` in POC and real deployments, but a fixed
0.5 s in the simulator's site workers (nvflare 2.9 ``simulator_worker.py``). A split step schedules one task per
site only after the server's decoder step, so a site that asked a moment too early starts its part of the next
step up to that long after the others, and the whole step waits for it.

:class:`TaskLongPoll` wraps the server runner's task lookup (``ServerRunner._try_to_get_task``, nvflare 2.9,
reached through :mod:`splitunet.flare.nvflare_compat`): a request that finds no task sleeps until the workflow
announces new tasks (:meth:`TaskLongPoll.notify`) or ``retry_s`` passes, looks again, and gives up after
``timeout_s``. Sleeping on a condition rather than polling keeps the waiting request threads off the CPU and the
GIL while the server computes. Each waiting site holds one of the server's request threads for at most
``timeout_s``, so the timeout must stay well below the sites' task-request timeout.
"""

from __future__ import annotations

import threading
import time

from nvflare.apis.fl_context import FLContext

from splitunet.flare.nvflare_compat import TRY_AGAIN, unwrap_task_lookup, wrap_task_lookup

__all__ = ["TaskLongPoll"]


class TaskLongPoll:
    """Holds sites' task requests at the server until the workflow has a task for them.

    Args:
        timeout_s: longest wait of one task request, in seconds.
        retry_s: longest sleep between two lookups of a waiting request (a fallback: :meth:`notify` wakes it).
    """

    def __init__(self, timeout_s: float, retry_s: float = 0.1):
        self.timeout_s = float(timeout_s)
        self.retry_s = float(retry_s)
        self._scheduled = threading.Condition()
        self._announcements = 0  # how many times tasks were announced; a request waits for the next one
        self._runner = None
        self._original = None

    def install(self, fl_ctx: FLContext) -> bool:
        """Wrap the task lookup of the server runner in ``fl_ctx``; ``False`` (and nothing changed) without one."""

        def make_lookup(original):
            self._original = original
            return self._lookup

        self._runner = wrap_task_lookup(fl_ctx, make_lookup)
        return self._runner is not None

    def uninstall(self) -> None:
        """Give the runner its own lookup back and release waiting requests."""
        if self._runner is not None:
            unwrap_task_lookup(self._runner)
            self._runner = None
        self.notify()

    def notify(self) -> None:
        """Wake every waiting request: the workflow has just scheduled tasks."""
        with self._scheduled:
            self._announcements += 1
            self._scheduled.notify_all()

    def _lookup(self, client, fl_ctx: FLContext, *args, **kwargs):
        deadline = time.monotonic() + self.timeout_s
        while True:
            # Read before looking, so that tasks announced between the lookup and the wait are not slept through.
            seen = self._announcements
            task_name, task_id, task_data = self._original(client, fl_ctx)
            remaining = deadline - time.monotonic()
            if (task_name and task_name != TRY_AGAIN) or remaining <= 0 or self._runner is None:
                return task_name, task_id, task_data
            with self._scheduled:
                if self._announcements == seen:
                    self._scheduled.wait(timeout=min(self.retry_s, remaining))
