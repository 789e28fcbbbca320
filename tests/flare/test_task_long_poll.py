"""flare.task_long_poll: the server runner's task lookup waits for a task, and gets its own behaviour back."""

from __future__ import annotations

import threading
import time

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from splitunet.flare.task_long_poll import enable_task_long_poll


class _Runner:
    """The part of nvflare's ServerRunner that the long poll relies on: a lookup that retries until ``timeout``."""

    def __init__(self):
        self.task = None
        self.lookups = 0

    def _try_to_get_task(self, client, fl_ctx, timeout=None, retry_interval=0.005):
        start = time.time()
        while True:
            self.lookups += 1
            if self.task is not None:
                return self.task
            if timeout is None or time.time() - start > timeout:
                return "", "", None
            time.sleep(retry_interval)


def _context(runner) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.RUNNER, runner, private=True, sticky=False)
    return fl_ctx


def test_a_request_waits_for_the_task_scheduled_meanwhile_then_the_runner_is_restored():
    runner = _Runner()
    restore = enable_task_long_poll(_context(runner), timeout_s=2.0, retry_s=0.005)
    threading.Timer(0.2, lambda: setattr(runner, "task", ("split_step", "id", "data"))).start()
    start = time.perf_counter()
    assert runner._try_to_get_task("site-1", None) == ("split_step", "id", "data")
    assert 0.15 < time.perf_counter() - start < 1.5
    restore()
    runner.task, runner.lookups = None, 0
    assert runner._try_to_get_task("site-1", None) == ("", "", None)
    assert runner.lookups == 1  # back to one lookup, no waiting


def test_a_request_with_no_task_is_answered_after_the_timeout():
    runner = _Runner()
    enable_task_long_poll(_context(runner), timeout_s=0.1, retry_s=0.01)
    start = time.perf_counter()
    assert runner._try_to_get_task("site-1", None) == ("", "", None)
    assert 0.1 <= time.perf_counter() - start < 1.0


def test_a_runner_without_the_lookup_is_left_alone():
    assert enable_task_long_poll(_context(object()), timeout_s=1.0, retry_s=0.01) is None


def test_the_installed_flare_runner_has_the_lookup_with_a_timeout():
    import inspect

    from nvflare.private.fed.server.server_runner import ServerRunner

    parameters = inspect.signature(ServerRunner._try_to_get_task).parameters
    assert {"client", "fl_ctx", "timeout", "retry_interval"} <= set(parameters)
