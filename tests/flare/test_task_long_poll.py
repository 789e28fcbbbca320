"""flare.task_long_poll: a task request waits at the server until the workflow announces tasks, then gets its own."""

from __future__ import annotations

import inspect
import threading
import time

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from splitunet.flare.task_long_poll import TaskLongPoll

TASK = ("split_step", "task-id", "data")


class _Runner:
    """The part of nvflare's ServerRunner the long poll wraps: one lookup of the workflow's tasks for a client."""

    def __init__(self):
        self.task = None
        self.lookups = 0

    def _try_to_get_task(self, client, fl_ctx, timeout=None, retry_interval=0.005):
        self.lookups += 1
        return self.task if self.task is not None else ("", "", None)


def _context(runner) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.RUNNER, runner, private=True, sticky=False)
    return fl_ctx


def _schedule_later(runner, poll, delay_s):
    def schedule():
        runner.task = TASK
        poll.notify()

    threading.Timer(delay_s, schedule).start()


def test_a_request_is_answered_as_soon_as_its_task_is_announced():
    runner, poll = _Runner(), TaskLongPoll(timeout_s=5.0, retry_s=10.0)
    assert poll.install(_context(runner))
    _schedule_later(runner, poll, 0.2)
    start = time.perf_counter()
    assert runner._try_to_get_task("site-1", None) == TASK
    # Woken by the announcement, not by the 10 s retry; one lookup before, one after.
    assert 0.15 < time.perf_counter() - start < 2.0 and runner.lookups == 2


def test_a_request_with_no_task_is_answered_after_the_timeout_and_uninstall_restores_the_runner():
    runner, poll = _Runner(), TaskLongPoll(timeout_s=0.2, retry_s=0.05)
    poll.install(_context(runner))
    start = time.perf_counter()
    assert runner._try_to_get_task("site-1", None) == ("", "", None)
    assert 0.2 <= time.perf_counter() - start < 1.5 and runner.lookups > 2  # looked again every retry
    poll.uninstall()
    runner.lookups = 0
    assert runner._try_to_get_task("site-1", None) == ("", "", None) and runner.lookups == 1


def test_uninstall_releases_a_waiting_request():
    runner, poll = _Runner(), TaskLongPoll(timeout_s=5.0, retry_s=10.0)
    poll.install(_context(runner))
    threading.Timer(0.2, poll.uninstall).start()
    start = time.perf_counter()
    assert runner._try_to_get_task("site-1", None) == ("", "", None)
    assert time.perf_counter() - start < 2.0


def test_a_runner_without_the_lookup_is_left_alone():
    assert TaskLongPoll(timeout_s=1.0).install(_context(object())) is False


def test_the_installed_flare_runner_has_the_lookup_it_wraps():
    from nvflare.private.fed.server.server_runner import ServerRunner

    assert {"client", "fl_ctx"} <= set(inspect.signature(ServerRunner._try_to_get_task).parameters)
