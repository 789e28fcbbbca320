"""What every data holder's executor shares: task dispatch that never lets a case ID or a data path reach the server.

The split job's modality sites (:class:`~splitunet.flare.executor.SplitSiteExecutor`) and the U-shape's hospitals
(:class:`~splitunet.u_shape.executor.UShapeHospitalExecutor`) answer different tasks but fail the same way: a task
that raises is answered with an error reply whose text names the party and, for a data error, the case's key only
(:func:`site_error_message`); the full message, which names cases and files, stays in the party's own log. A party
that refused the job for its epsilon cap refuses every later task with the same reason.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from splitunet.data.case_keys import PrivateNames
from splitunet.dp.site_cap import EpsilonCapExceeded
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.flare.replies import error_reply, reply_error_message

__all__ = ["GuardedTaskExecutor", "TaskHandler", "site_error_message"]

# A task's handler: the task's DXO, this party's name and the task's context -> the reply.
TaskHandler = Callable[[DXO, str, FLContext], Shareable]


def site_error_message(error: BaseException, party: str, private: PrivateNames) -> str:
    """What a site tells the server about a failed task: no case ID, no path under its data folders.

    A data error sends only the party, the error class and the case's key (the message names the case and its
    file); any other error keeps its message, scrubbed by ``private``, since the server must learn why (a refused
    job, a configuration error). The full message stays in the site's own log.

    Args:
        error: what the task raised.
        party: this site's name.
        private: this site's case IDs, secret and data folders, as far as known.
    """
    details = f"details in {party}'s log"
    if isinstance(error, SplitUNetDataError):
        key = error.case_key or private.key(error.case)
        case = f" (case key {key})" if key else ""
        return f"{party}: {type(error).__name__}{case}; {details}"
    text = f"{type(error).__name__}: {error}" if isinstance(error, OSError) else str(error)
    scrubbed = private.scrub(text)
    return f"{party}: {scrubbed}" if scrubbed == text else f"{party}: {scrubbed} ({details})"


class GuardedTaskExecutor(Executor):
    """An executor whose tasks go to the handlers of :meth:`task_handlers`, with failures answered by key only.

    Subclasses fill :attr:`private` at setup (their case IDs, secret and data folders) and set :attr:`refusal`
    through the exception they raise when the job would exceed their epsilon cap.

    Attributes:
        private: what no message leaving this party may name.
        refusal: why this party refused the job (its epsilon cap), repeated for every later task.
    """

    def __init__(self):
        super().__init__()
        self.private = PrivateNames()
        self.refusal: EpsilonCapExceeded | None = None

    def task_handlers(self) -> Mapping[str, TaskHandler]:
        """Task name -> handler."""
        raise NotImplementedError

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        party = fl_ctx.get_identity_name()
        handler = self.task_handlers().get(task_name)
        if handler is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        rejected = reply_error_message(shareable)
        if rejected:
            # A filter (at the server, or this party's own data filter) refused the task data.
            self.log_error(fl_ctx, f"task {task_name} arrived rejected: {rejected}")
            return error_reply(f"{party}: task data rejected before execution: {self.private.scrub(rejected)}")
        try:
            if self.refusal is not None:
                raise self.refusal
            return handler(from_shareable(shareable), party, fl_ctx)
        except Exception as error:  # noqa: BLE001 - the server must learn why, not just that, a party failed
            if isinstance(error, EpsilonCapExceeded):
                # It names the cap and the projected epsilon only: the server learns why, and so does every later task.
                self.refusal = error
            full = f"{type(error).__name__}: {error}"
            if not isinstance(error, (SplitUNetDataError, SplitUNetConfigError, ValueError, RuntimeError)):
                full += "\n" + traceback.format_exc()
            # The full message names cases and files: a warning, because provisioned FLARE sites stream their
            # error log (ERROR and above) to the server's job store, and without a log event, because FLARE's
            # info collector hands those to the admin client.
            self.log_warning(fl_ctx, f"task {task_name} failed: {party}: {full}", fire_event=False)
            message = site_error_message(error, party, self.private)
            self.log_error(fl_ctx, f"task {task_name} failed: {message}")
            return error_reply(message)
