"""flare.nvflare_compat: the FLARE internals the workflows use, the version check, and analytics as FLARE sends them."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from types import SimpleNamespace

import nvflare
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.widgets.streaming import AnalyticsSender

from splitunet.flare import nvflare_compat
from splitunet.flare.controller import SplitLearningController
from splitunet.flare.nvflare_compat import (
    VERIFIED_NVFLARE,
    send_scalar,
    set_task_check_period,
    unwrap_task_lookup,
    version_warning,
    wrap_task_lookup,
)


def test_the_installed_flare_is_the_verified_one():
    assert nvflare.__version__.startswith(VERIFIED_NVFLARE + ".") and version_warning() is None
    assert version_warning(f"{VERIFIED_NVFLARE}.7") is None


def test_another_flare_version_gets_a_message_naming_both_versions():
    message = version_warning("2.10.1")
    assert "nvflare 2.10.1 is installed" in message and f"verified on nvflare {VERIFIED_NVFLARE}.x" in message


def test_the_task_check_period_is_set_where_the_communicator_has_it():
    from nvflare.apis.impl.wf_comm_server import WFCommServer

    communicator = WFCommServer()
    assert set_task_check_period(communicator, 0.005) and communicator._task_check_period == 0.005
    assert not set_task_check_period(SimpleNamespace(), 0.005) and not set_task_check_period(None, 0.005)


class _Runner:
    def _try_to_get_task(self, client, fl_ctx):
        return "task", "id", None


def _context(runner) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.RUNNER, runner, private=True, sticky=False)
    return fl_ctx


def test_the_task_lookup_is_wrapped_and_given_back():
    runner = _Runner()
    assert wrap_task_lookup(_context(runner), lambda original: lambda c, f: ("wrapped", *original(c, f)[1:])) is runner
    assert runner._try_to_get_task("site-1", None) == ("wrapped", "id", None)
    unwrap_task_lookup(runner)
    assert runner._try_to_get_task("site-1", None) == ("task", "id", None)


def test_nothing_is_wrapped_without_a_lookup_or_a_try_again_name(monkeypatch):
    assert wrap_task_lookup(_context(object()), lambda original: original) is None
    monkeypatch.setattr(nvflare_compat, "TRY_AGAIN", None)
    runner = _Runner()
    assert wrap_task_lookup(_context(runner), lambda original: None) is None and "_try_to_get_task" not in vars(runner)


def test_the_installed_flare_has_what_the_long_poll_wraps():
    from nvflare.private.defs import SpecialTaskName
    from nvflare.private.fed.server.server_runner import ServerRunner

    assert nvflare_compat.TRY_AGAIN == SpecialTaskName.TRY_AGAIN
    assert {"client", "fl_ctx"} <= set(inspect.signature(ServerRunner._try_to_get_task).parameters)


class _Engine:
    """Fires events to a recorder, as FLARE's engine fires them to the job's components."""

    def __init__(self):
        self.events = []

    @contextmanager
    def new_context(self):
        fl_ctx = FLContext()
        fl_ctx.set_prop(ReservedKey.ENGINE, self, private=True, sticky=False)
        yield fl_ctx

    def fire_event(self, event_type, fl_ctx):
        self.events.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))


def test_a_scalar_is_the_event_flares_analytics_sender_fires():
    ours, theirs = _Engine(), _Engine()
    with ours.new_context() as fl_ctx:
        send_scalar(FLComponent(), fl_ctx, "val_dice_TC", 0.25, 8)
    sender = AnalyticsSender()
    sender.engine = theirs
    sender.add("val_dice_TC", 0.25, AnalyticsDataType.SCALAR, global_step=8)
    [(our_event, our_data)], [(their_event, their_data)] = ours.events, theirs.events
    assert our_event == their_event == ANALYTIC_EVENT_TYPE
    assert our_data["DXO"] == their_data["DXO"]


class _Recorder:
    def __init__(self):
        self.lines = []

    def __call__(self, fl_ctx, message, fire_event=True):
        self.lines.append(message)


def test_the_workflow_says_which_feature_is_off_on_an_unknown_flare(monkeypatch):
    controller = SplitLearningController(task_long_poll_s=1.0)
    controller.communicator = SimpleNamespace()  # no task check period to set
    warnings, errors = _Recorder(), _Recorder()
    monkeypatch.setattr(controller, "log_warning", warnings)
    monkeypatch.setattr(controller, "log_error", errors)
    monkeypatch.setattr("splitunet.flare.site_tasks.version_warning", lambda: "nvflare 9.0 is installed, ...")
    controller.start_controller(_context(object()))
    assert warnings.lines == ["nvflare 9.0 is installed, ..."]
    assert "task_check_period has no effect" in errors.lines[0]
    assert "task_long_poll_s has no effect" in errors.lines[1] and controller._long_poll is None


def test_a_panic_is_seen_in_the_workflows_context_but_an_abort_is_not():
    from nvflare.apis.fl_context import FLContextManager

    manager = FLContextManager()
    workflow_ctx = manager.new_context()
    assert not nvflare_compat.fatal_error_reported(workflow_ctx)
    # As nvflare 2.9's ServerRunner marks a panic, in the context of the event, before it aborts the run.
    manager.new_context().set_prop(FLContextKey.FATAL_SYSTEM_ERROR, True, private=True, sticky=True)
    assert nvflare_compat.fatal_error_reported(workflow_ctx)
