"""flare.site_tasks: a disconnected site, an abort and a failure in a round trip and in ``results.json``.

A fake task communicator stands in for FLARE's: it records the tasks, answers for the sites told to answer and says
which sites FLARE deems disconnected, through the public ``Controller.get_client_disconnect_time``.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, TaskCompletionStatus
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from splitunet.flare import site_tasks
from splitunet.flare.site_tasks import SiteTaskController, SplitRunAborted, SplitRunError
from splitunet.server.site_roster import SiteRoster
from splitunet.wire.protocol import TaskName
from splitunet.wire.transport import control_dxo

SITES = {"site-1": "flair", "site-2": "t1"}
# Far beyond any wait of these tests: a failure must come from the disconnect or the abort, not the timeout.
TASK_TIMEOUT_S = 600
PROMPT_S = 5.0


class FakeCommunicator:
    """FLARE's task communicator as the workflow uses it; sites in ``answering`` reply at once."""

    def __init__(self, answering=()):
        self.answering = set(answering)
        self.tasks = {}
        self.cancelled = []
        self.disconnected: dict[str, float] = {}

    def send(self, task, fl_ctx, targets, send_order, task_assignment_timeout):
        [site] = targets
        self.tasks[site] = task
        if site in self.answering:
            client_task = ClientTask(Client(site, None), task)
            client_task.task_sent_time = time.time()
            client_task.result = control_dxo({}).to_shareable()
            task.result_received_cb(client_task=client_task, fl_ctx=fl_ctx)

    def cancel_task(self, task, completion_status, fl_ctx):
        self.cancelled.append(task)

    def cancel_all_tasks(self, completion_status, fl_ctx):
        self.cancelled.extend(self.tasks.values())

    def get_client_disconnect_time(self, client_name):
        return self.disconnected.get(client_name)


def _controller(communicator, on_site_failure="stop"):
    controller = SiteTaskController(task_timeout=TASK_TIMEOUT_S, on_site_failure=on_site_failure)
    controller.communicator = communicator
    controller.sites = list(SITES)
    controller.roster = SiteRoster(list(SITES), SITES)
    return controller


def _later(seconds, action):
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def _round_trip(controller, abort_signal=None, iteration=7):
    data = controller._control_data({}, list(SITES))
    return controller._round_trip(TaskName.STEP, data, iteration, FLContext(), abort_signal or Signal())


def test_a_site_flare_deems_disconnected_stops_the_run_at_once():
    communicator = FakeCommunicator(answering=["site-1"])
    controller = _controller(communicator)
    _later(0.2, lambda: communicator.disconnected.update({"site-2": time.time()}))
    start = time.monotonic()
    with pytest.raises(SplitRunError, match=r"site site-2 disconnected while it held task split_step at iteration 7"):
        _round_trip(controller)
    assert time.monotonic() - start < PROMPT_S
    assert communicator.tasks["site-2"] in communicator.cancelled


def test_a_disconnected_site_is_dropped_when_the_run_may_continue():
    communicator = FakeCommunicator(answering=["site-1"])
    communicator.disconnected["site-2"] = time.time()
    controller = _controller(communicator, on_site_failure="continue")
    replies = _round_trip(controller)
    assert list(replies) == ["site-1"]
    assert controller.roster.active == ["site-1"]
    [dropped] = controller.record.dropped_sites
    assert dropped["site"] == "site-2" and dropped["iteration"] == 7 and "disconnected" in dropped["reason"]


def test_a_task_flare_ended_because_its_site_is_dead_names_the_disconnect():
    communicator = FakeCommunicator(answering=["site-1"])
    controller = _controller(communicator)
    _later(0.2, lambda: setattr(communicator.tasks["site-2"], "completion_status", TaskCompletionStatus.CLIENT_DEAD))
    with pytest.raises(SplitRunError, match="site site-2 disconnected"):
        _round_trip(controller)


def test_a_silent_site_that_stays_connected_still_waits_for_the_timeout():
    communicator = FakeCommunicator(answering=["site-1"])
    controller = _controller(communicator)
    controller.settings.task_timeout = 1  # checked at construction; a short wait for the test
    with pytest.raises(SplitRunError, match=r"site site-2 did not answer task split_step within 1s at iteration 7"):
        _round_trip(controller)


def test_an_abort_while_waiting_is_not_a_failure():
    communicator = FakeCommunicator(answering=["site-1"])
    controller = _controller(communicator)
    abort_signal = Signal()
    _later(0.2, lambda: abort_signal.trigger(True))
    start = time.monotonic()
    with pytest.raises(SplitRunAborted, match="aborted while waiting for split_step at iteration 7"):
        _round_trip(controller, abort_signal)
    assert time.monotonic() - start < PROMPT_S
    assert not issubclass(SplitRunAborted, SplitRunError)
    assert communicator.tasks["site-2"] in communicator.cancelled


def test_an_abort_that_comes_with_a_disconnect_reports_the_disconnect():
    # FLARE aborts a job itself when too few sites are left: the disconnect is the cause then.
    communicator = FakeCommunicator(answering=["site-1"])
    communicator.disconnected["site-2"] = time.time()
    controller = _controller(communicator)
    abort_signal = Signal()
    abort_signal.trigger(True)
    with pytest.raises(SplitRunError, match="site site-2 disconnected"):
        _round_trip(controller, abort_signal)


class _Workflow(SiteTaskController):
    """Trains ``iterations`` steps (no tasks), then does what ``then`` says."""

    def __init__(self, then, iterations=4):
        super().__init__(task_timeout=TASK_TIMEOUT_S)
        self.then, self.iterations = then, iterations
        self.panics = []

    def _run(self, abort_signal, fl_ctx, out_dir):
        self.sites = list(SITES)
        self.roster = SiteRoster(list(SITES), SITES)
        self.record.iterations = self.iterations
        self.then(abort_signal)

    def system_panic(self, reason, fl_ctx):
        self.panics.append(reason)


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(site_tasks, "run_dir", lambda fl_ctx: tmp_path)
    return lambda: json.loads((tmp_path / "results.json").read_text())


def _aborted_while_waiting(abort_signal):
    abort_signal.trigger(True)
    raise SplitRunAborted("aborted while waiting for split_step at iteration 5")


def _run(workflow, fl_ctx=None):
    workflow.communicator = FakeCommunicator()
    workflow.control_flow(Signal(), fl_ctx or FLContext())
    return workflow


def test_an_aborted_run_is_recorded_as_aborted_without_a_panic(results):
    workflow = _run(_Workflow(_aborted_while_waiting))
    assert results() == {"status": "aborted", "iterations": 4}
    assert workflow.panics == []


def test_an_abort_between_tasks_is_recorded_as_aborted(results):
    workflow = _run(_Workflow(lambda abort_signal: abort_signal.trigger(True)))
    assert results()["status"] == "aborted" and workflow.panics == []


def test_a_failure_still_fails_the_run_with_a_panic(results):
    def fail(abort_signal):
        raise SplitRunError("site site-2 failed task split_step at iteration 4: boom")

    workflow = _run(_Workflow(fail))
    assert results()["status"] == "failed" and "boom" in results()["error"]
    assert len(workflow.panics) == 1


def test_an_abort_flare_started_itself_after_a_panic_is_a_failure(results):
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.FATAL_SYSTEM_ERROR, True, private=True, sticky=True)
    workflow = _run(_Workflow(_aborted_while_waiting), fl_ctx)
    assert results()["status"] == "failed" and "system error" in results()["error"]
    assert len(workflow.panics) == 1


def test_an_abort_while_a_needed_site_is_disconnected_names_it(results):
    workflow = _Workflow(_aborted_while_waiting)
    workflow.communicator = FakeCommunicator()
    workflow.communicator.disconnected["site-1"] = time.time()
    workflow.control_flow(Signal(), FLContext())
    record = results()
    assert record["status"] == "failed"
    assert "site site-1 disconnected" in record["error"] and "after iteration 4" in record["error"]
