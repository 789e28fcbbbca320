"""Every use of NVIDIA FLARE internals, in one place, checked against the FLARE version it was verified on.

The workflows need three things FLARE 2.9 offers no public way to do (docs/design.md, "FLARE facts"):

* the task check period of the server's task communicator: ``Controller(task_check_period=...)`` does not reach
  ``WFCommServer._task_check_period`` in 2.9, and its 0.2 s default adds latency to every step;
* the server runner's task lookup ``ServerRunner._try_to_get_task``, wrapped by
  :class:`~splitunet.flare.task_long_poll.TaskLongPoll`;
* ``nvflare.private.defs.SpecialTaskName.TRY_AGAIN``, what that lookup answers when it has no task;
* whether FLARE itself ended the run: its server runner marks a panic (``system_panic`` of any component) in a
  sticky context property before it triggers the abort signal, which an admin's ``abort_job`` triggers as well.

Whether a site is disconnected is public (``Controller.get_client_disconnect_time``), so it is not here.

Analytics go through FLARE's public functions (:func:`send_scalar`). On another FLARE version each internal is
looked up defensively: :func:`version_warning` says the run is on an unverified version, and each helper reports
whether it could do its job, so the workflow can say which feature is off rather than fail obscurely.
"""

from __future__ import annotations

from collections.abc import Callable

import nvflare
from nvflare.apis.analytix import AnalyticsDataType, LogWriterName, TrackConst
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.widgets.streaming import create_analytic_dxo, send_analytic_dxo

__all__ = [
    "VERIFIED_NVFLARE",
    "TRY_AGAIN",
    "version_warning",
    "set_task_check_period",
    "wrap_task_lookup",
    "unwrap_task_lookup",
    "send_scalar",
    "fatal_error_reported",
]

# The FLARE release line (major.minor) whose internals this module was checked against.
VERIFIED_NVFLARE = "2.9"
# The server runner's method that asks the current workflow for a site's task (nvflare 2.9).
_GET_TASK = "_try_to_get_task"
# The task communicator's attribute that paces its waits (nvflare 2.9 ``WFCommServer``).
_CHECK_PERIOD = "_task_check_period"

try:
    from nvflare.private.defs import SpecialTaskName

    TRY_AGAIN: str | None = SpecialTaskName.TRY_AGAIN
except (ImportError, AttributeError):  # another FLARE: the long poll cannot tell "no task" from a task
    TRY_AGAIN = None


def _release_line(version: str) -> str:
    return ".".join(version.split(".")[:2])


def version_warning(installed: str | None = None) -> str | None:
    """A message when the installed FLARE is not of the verified release line, else ``None``.

    Args:
        installed: the version to check (default: the installed ``nvflare.__version__``).
    """
    installed = installed or getattr(nvflare, "__version__", "unknown")
    if _release_line(installed) == VERIFIED_NVFLARE:
        return None
    return (
        f"nvflare {installed} is installed, but the Split-U-Net workflows were verified on nvflare "
        f"{VERIFIED_NVFLARE}.x; they reach into FLARE internals (task check period, the server's task lookup) "
        "that may have changed: check the warnings that follow, or install nvflare "
        f"{VERIFIED_NVFLARE}.x"
    )


def set_task_check_period(communicator, period_s: float) -> bool:
    """Make the server's task communicator check its tasks every ``period_s`` seconds.

    Returns:
        whether the communicator has the attribute to set (``False``: FLARE's own period stays).
    """
    if communicator is None or not hasattr(communicator, _CHECK_PERIOD):
        return False
    setattr(communicator, _CHECK_PERIOD, float(period_s))
    return True


def wrap_task_lookup(fl_ctx: FLContext, make_lookup: Callable[[Callable], Callable]):
    """Replace the task lookup of the server runner in ``fl_ctx`` by ``make_lookup(original)``.

    Args:
        fl_ctx: a server context that holds the runner.
        make_lookup: given the runner's own bound lookup ``(client, fl_ctx) -> (task_name, task_id, data)``,
            returns the function to use instead (same arguments and answer).

    Returns:
        the runner, to pass to :func:`unwrap_task_lookup`; ``None`` (and nothing changed) when there is no runner
        with that lookup or no way to recognise FLARE's "try again" answer.
    """
    runner = fl_ctx.get_prop(FLContextKey.RUNNER)
    original = getattr(runner, _GET_TASK, None)
    if original is None or TRY_AGAIN is None:
        return None
    setattr(runner, _GET_TASK, make_lookup(original))
    return runner


def unwrap_task_lookup(runner) -> None:
    """Give the runner its own lookup back (the bound method lives on its class; the wrapper on the instance)."""
    runner.__dict__.pop(_GET_TASK, None)


def send_scalar(component: FLComponent, fl_ctx: FLContext, tag: str, value: float, step: int) -> None:
    """Fire one scalar as a FLARE analytics event; an ``AnalyticsReceiver`` of the job (TensorBoard) records it.

    The same event, DXO and writer as FLARE's ``AnalyticsSender.add`` builds, fired in a fresh context so that the
    event data does not stay in the caller's.
    """
    dxo = create_analytic_dxo(
        tag=tag,
        value=float(value),
        data_type=AnalyticsDataType.SCALAR,
        writer=LogWriterName.TORCH_TB,
        **{TrackConst.GLOBAL_STEP_KEY: int(step)},
    )
    with fl_ctx.get_engine().new_context() as event_ctx:
        send_analytic_dxo(component, dxo=dxo, fl_ctx=event_ctx)


def fatal_error_reported(fl_ctx: FLContext) -> bool:
    """Whether a component of this run has reported a fatal error (``system_panic``) to FLARE's server runner.

    The nvflare 2.9 ``ServerRunner`` sets the sticky ``FLContextKey.FATAL_SYSTEM_ERROR`` when it handles a panic
    and then aborts the run; sticky properties reach every context of the run, the workflow's own included. An
    admin's ``abort_job`` triggers the same abort signal without it. ``False`` where the property is not set (or
    another FLARE does not set it).
    """
    return bool(fl_ctx.get_prop(FLContextKey.FATAL_SYSTEM_ERROR, False))
