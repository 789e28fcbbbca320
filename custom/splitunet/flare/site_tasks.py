"""What every Split-U-Net server workflow shares: one task to every site at once, checked replies, a results file.

Training (:class:`~splitunet.flare.controller.SplitLearningController`) and inference
(:class:`~splitunet.flare.inference_controller.SplitInferenceController`) both talk to the sites through
:meth:`SiteTaskController._round_trip`: a site that fails a task, stays silent or that FLARE deems disconnected stops
the run naming it, or is dropped when the workflow tolerates that. An abort (FLARE's abort signal, e.g. an admin's
``abort_job``) ends the run as aborted, not failed. Whatever happens, ``results.json`` in the server's run folder says
how the run ended and why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, SendOrder, Task, TaskCompletionStatus
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from splitunet.atomic_files import write_json_atomic
from splitunet.compute.devices import configure_threads
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.flare.nvflare_compat import fatal_error_reported, set_task_check_period, version_warning
from splitunet.flare.replies import reply_error_message
from splitunet.flare.task_long_poll import TaskLongPoll
from splitunet.flare.workspace_paths import run_dir
from splitunet.server.run_record import RunRecord
from splitunet.server.run_settings import SITE_FAILURE_POLICIES, TaskSettings
from splitunet.server.site_roster import SiteRoster
from splitunet.server.sliding_window import EncodeFn
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import DataKind, MetaKey, TaskName
from splitunet.wire.transport import control_dxo, dxo_to_features, register_tensor_support

__all__ = ["SiteTaskController", "SentTasks", "SplitRunError", "SplitRunAborted", "SITE_FAILURE_POLICIES"]


class SplitRunError(RuntimeError):
    """The run cannot go on (a site failed or stopped answering); the message names the site and step."""


class SplitRunAborted(RuntimeError):
    """The run was aborted (FLARE's abort signal) while it waited for the sites; not a failure.

    Not a :class:`SplitRunError`, so that an abort is never taken for a site's failure.
    """


@dataclass
class SentTasks:
    """Tasks of one name scheduled at once, one per site, whose replies :meth:`SiteTaskController._await_replies`
    waits for; FLARE's result callbacks fill :attr:`replies` from its own threads.

    Attributes:
        task_name: the tasks' name.
        scheduled_at: ``time.time()`` when they were scheduled.
        tasks: site -> its task.
        replies: site -> its reply, as it arrives.
        sent_at: site -> ``time.time()`` when FLARE handed the site its task.
        timeout: seconds each site has to answer.
        deadline: ``time.monotonic()`` after which a silent site has not answered in time.
    """

    task_name: str
    scheduled_at: float
    tasks: dict[str, Task] = field(default_factory=dict)
    replies: dict[str, Shareable] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    timeout: int = 0
    deadline: float = 0.0


class SiteTaskController(Controller):
    """Base of the Split-U-Net server workflows (not a workflow itself: subclasses implement ``_run``).

    The arguments are checked in :class:`~splitunet.server.run_settings.TaskSettings` (they are its fields); a
    workflow with more arguments builds its own settings and calls :meth:`_use_settings` instead of this
    constructor. What the run records goes to :attr:`record` (a :attr:`record_class`), written as
    ``results.json``.
    """

    record_class: type[RunRecord] = RunRecord

    def __init__(
        self,
        task_timeout: int = 600,
        setup_timeout: int = 600,
        on_site_failure: str = "stop",
        task_check_period: float = 0.005,
        num_threads: int = 0,
        task_long_poll_s: float = 0.0,
    ):
        self._use_settings(
            TaskSettings(
                task_timeout=task_timeout,
                setup_timeout=setup_timeout,
                on_site_failure=on_site_failure,
                task_check_period=task_check_period,
                num_threads=num_threads,
                task_long_poll_s=task_long_poll_s,
            )
        )

    def _use_settings(self, settings: TaskSettings) -> None:
        """Set the workflow up from checked settings (a :class:`TaskSettings` or a workflow's own)."""
        Controller.__init__(self, task_check_period=settings.task_check_period)
        self.settings = settings
        self._long_poll = TaskLongPoll(settings.task_long_poll_s) if settings.task_long_poll_s > 0 else None
        self.model_config: SplitModelConfig | None = None
        self.sites: list[str] = []  # in decoder order, dropped ones included
        self.site_modality: dict[str, str] = {}
        self.roster: SiteRoster | None = None
        self.record = self.record_class()
        # Seconds from scheduling the last round trip's tasks until each site took its own.
        self.last_dispatch_s: dict[str, float] = {}

    def start_controller(self, fl_ctx: FLContext):
        register_tensor_support()
        configure_threads(self.settings.num_threads)
        note = version_warning()
        if note:
            self.log_warning(fl_ctx, note)
        # Controller(task_check_period=...) does not reach WFCommServer in nvflare 2.9 (docs/design.md, "FLARE facts").
        if not set_task_check_period(self.communicator, self.settings.task_check_period):
            self.log_error(
                fl_ctx,
                "cannot set this FLARE's task check period: task_check_period has no effect, and every step may "
                "wait up to FLARE's own period (0.2 s in nvflare 2.9) longer",
                fire_event=False,
            )
        if self._long_poll is not None and not self._long_poll.install(fl_ctx):
            self.log_error(
                fl_ctx, "this FLARE cannot hold task requests; task_long_poll_s has no effect", fire_event=False
            )
            self._long_poll = None

    def _run(self, abort_signal: Signal, fl_ctx: FLContext, out_dir: Path) -> None:
        raise NotImplementedError

    def _sites_to_use(self, fl_ctx: FLContext) -> list[str]:
        """The job's ``sites``, else every connected client, sorted by name."""
        sites = self.settings.sites or sorted(client.name for client in fl_ctx.get_engine().get_clients())
        if not sites:
            raise SplitRunError("no sites are connected")
        return list(sites)

    def _decoder_order(self) -> Sequence[str | None]:
        """The site feeding each decoder input (``None``: no site holds that modality in this run)."""
        return self.sites

    def stop_controller(self, fl_ctx: FLContext):
        self.cancel_all_tasks(fl_ctx=fl_ctx)
        if self._long_poll is not None:
            self._long_poll.uninstall()

    def process_result_of_unknown_task(
        self, client: Client, task_name: str, client_task_id: str, result: Shareable, fl_ctx: FLContext
    ):
        self.log_warning(fl_ctx, f"dropped late result of task {task_name} from {client.name}")

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        out_dir = run_dir(fl_ctx)
        self.record = self.record_class()
        where = "between tasks"
        try:
            try:
                self._run(abort_signal, fl_ctx, out_dir)
            except SplitRunAborted as aborted:
                where = str(aborted)
            if abort_signal.triggered:
                self._raise_if_stopped_by_flare(fl_ctx, where)
            self.record.finish(aborted=abort_signal.triggered)
        except Exception as error:  # noqa: BLE001 - any failure must still leave a results file saying why
            if not isinstance(error, (SplitRunError, SplitUNetDataError, SplitUNetConfigError)):
                self.log_exception(fl_ctx, f"unexpected error: {error}")
            self.record.fail(error)
            write_json_atomic(self.record.to_json(), out_dir / "results.json")
            self.system_panic(f"Split-U-Net run stopped: {error}", fl_ctx)
            return
        write_json_atomic(self.record.to_json(), out_dir / "results.json")
        if self.record.status == "aborted":
            # Someone asked for it (an admin's abort_job, a shutdown): a warning, not a panic.
            self.log_warning(
                fl_ctx,
                f"run aborted after iteration {self.record.iterations} ({where}); results written to "
                f"{out_dir / 'results.json'}",
            )
        else:
            self.log_info(fl_ctx, f"results written to {out_dir / 'results.json'}")

    def _raise_if_stopped_by_flare(self, fl_ctx: FLContext, where: str) -> None:
        """After an abort: fail the run when FLARE ended it itself rather than someone asking for it.

        FLARE aborts a job on any component's panic, e.g. its own when fewer sites than the job's ``min_clients``
        are left alive; a site the run still needs that FLARE deems disconnected is a failure too.

        Raises:
            SplitRunError: naming the disconnected sites, or the system error.
        """
        gone = self._disconnect_times(self.sites)
        fatal = fatal_error_reported(fl_ctx)
        needed = {site: when for site, when in gone.items() if fatal or site in self._active_sites()}
        if needed:
            names = "; ".join(
                f"site {site} disconnected (FLARE deems it gone since {time.ctime(needed[site])})"
                for site in sorted(needed)
            )
            raise SplitRunError(f"{names}; FLARE aborted the job after iteration {self.record.iterations} ({where})")
        if fatal:
            raise SplitRunError(
                f"FLARE aborted the job on a system error after iteration {self.record.iterations} ({where}); see "
                "the server's log"
            )

    def _active_sites(self) -> list[str]:
        """The sites still taking part: the roster's once training started, else every site of the run."""
        return list(self.roster.active) if self.roster is not None else list(self.sites)

    def _disconnect_times(self, sites) -> dict[str, float]:
        """Site -> when FLARE deemed it disconnected (``time.time()``), for the ``sites`` FLARE deems disconnected.

        FLARE deems a site disconnected once its job has been reported dead (its heartbeat stopped, or its job is
        gone from it) and the dead-client grace period passed without a sign of life (docs/design.md, "FLARE
        facts"). ``Controller.get_client_disconnect_time`` is FLARE's public way to ask.
        """
        times = {}
        for site in sites:
            when = self.get_client_disconnect_time(site)
            if when is not None:
                times[site] = when
        return times

    def _control_data(self, meta: dict, sites: Sequence[str] | None = None) -> dict[str, Shareable]:
        # One Shareable per task: FLARE writes task headers into it, so tasks must not share one.
        return {
            site: control_dxo(dict(meta)).to_shareable() for site in (self.roster.active if sites is None else sites)
        }

    def _features(
        self, replies: Mapping[str, DXO], senders: Sequence[str], order: Sequence[str | None] | None = None
    ) -> list:
        """Features in decoder order (``None`` for a site that sent none), checked; notes filters. Encoded levels stay
        encoded (:class:`~splitunet.wire.codec.EncodedLevel`) for the decoder's device to decode.

        Args:
            replies: site -> its reply.
            senders: the sites whose features count.
            order: the site feeding each decoder input (default :meth:`_decoder_order`; with several sites per
                modality, the sites of the cohort that encoded).
        """
        features = []
        for site in self._decoder_order() if order is None else order:
            if site is None or site not in senders:
                features.append(None)
                continue
            dxo = replies[site]
            self.record.note_filters(site, dxo.get_meta_prop(MetaKey.FILTER_TRAIL))
            # Codes stay encoded: the server's trainer copies them to its device and decodes them there, once.
            features.append(
                dxo_to_features(
                    dxo,
                    DataKind.ACTIVATIONS,
                    party=site,
                    expected_levels=self.model_config.sent_levels,
                    keep_encoded=True,
                )
            )
        return features

    def _encode_fn(
        self, iteration: int, fl_ctx: FLContext, abort_signal: Signal, without: str | None = None
    ) -> EncodeFn:
        """Encodes one plan of windows at every active site (but ``without``): features in decoder order."""

        def encode(plan: dict):
            sites = [site for site in self.roster.active if site != without]
            replies = self._round_trip(
                TaskName.ENCODE, self._control_data({MetaKey.PLAN: plan}, sites), iteration, fl_ctx, abort_signal
            )
            encoded = [site for site in sites if site in replies]
            if not encoded:
                raise SplitRunError(f"no site is left to encode validation windows at iteration {iteration}")
            return self._features(replies, encoded)

        return encode

    def _round_trip(
        self,
        task_name: str,
        data_by_site: Mapping[str, Shareable],
        iteration: int,
        fl_ctx: FLContext,
        abort_signal: Signal,
    ) -> dict[str, DXO]:
        """Send one task to each site at once and wait for every reply.

        A site that fails the task, that FLARE deems disconnected or that stays silent for ``task_timeout``
        (``setup_timeout`` at setup) stops the run, naming it; with ``on_site_failure="continue"`` after setup it
        is dropped instead and the replies of the others are returned.

        Raises:
            SplitRunError: a site failed (and may not be dropped), or every site dropped out.
            SplitRunAborted: FLARE's abort signal was triggered while waiting (and no awaited site is disconnected:
                FLARE also aborts a job whose sites are too few, and then the disconnect is what is reported).
        """
        sent = self._send_tasks(task_name, data_by_site, fl_ctx)
        return self._await_replies(sent, iteration, fl_ctx, abort_signal)

    def _send_tasks(self, task_name: str, data_by_site: Mapping[str, Shareable], fl_ctx: FLContext) -> SentTasks:
        """Schedule one task per site and return at once; :meth:`_await_replies` waits for them.

        Between the two the workflow may compute (a pipelined training step, ``pipeline_delay``): FLARE hands the
        tasks out and takes the replies in its own threads.
        """
        sent = SentTasks(task_name, time.time())  # FLARE stamps task hand-outs with time.time()

        def on_result(client_task: ClientTask, fl_ctx: FLContext):
            sent.replies[client_task.client.name] = client_task.result
            if client_task.task_sent_time is not None:
                sent.sent_at[client_task.client.name] = client_task.task_sent_time

        timeout = self.settings.setup_timeout if task_name == TaskName.SETUP else self.settings.task_timeout
        sent.timeout = timeout
        sent.deadline = time.monotonic() + timeout
        for site, data in data_by_site.items():
            task = Task(name=task_name, data=data, timeout=timeout, result_received_cb=on_result)
            self.send(task, fl_ctx, targets=[site], send_order=SendOrder.ANY)
            sent.tasks[site] = task
        if self._long_poll is not None:
            self._long_poll.notify()
        return sent

    def _await_replies(
        self, sent: SentTasks, iteration: int, fl_ctx: FLContext, abort_signal: Signal
    ) -> dict[str, DXO]:
        """Wait for every reply to tasks :meth:`_send_tasks` scheduled; see :meth:`_round_trip` for what fails."""
        task_name, tasks, replies, timeout = sent.task_name, sent.tasks, sent.replies, sent.timeout
        waiting = set(tasks)
        failures: dict[str, str] = {}
        disconnected: set[str] = set()
        while waiting:
            aborted = abort_signal.triggered  # read before the checks: a disconnect seen with it explains it
            gone = self._disconnect_times(site for site in waiting if site not in replies)
            for site in sorted(waiting):
                status = tasks[site].completion_status
                if site in replies:
                    waiting.discard(site)
                    error = reply_error_message(replies[site])
                    if error:
                        failures[site] = f"site {site} failed task {task_name} at iteration {iteration}: {error}"
                elif site in gone or status == TaskCompletionStatus.CLIENT_DEAD:
                    waiting.discard(site)
                    disconnected.add(site)
                    if status is None:
                        self.cancel_task(tasks[site], fl_ctx=fl_ctx)
                    failures[site] = (
                        f"site {site} disconnected while it held task {task_name} at iteration {iteration} "
                        f"(FLARE deems it gone; {time.time() - sent.scheduled_at:.0f}s after the task was scheduled)"
                    )
                elif status is not None or time.monotonic() > sent.deadline:
                    waiting.discard(site)
                    if status is None:
                        self.cancel_task(tasks[site], fl_ctx=fl_ctx)
                    ended = "" if status in (None, TaskCompletionStatus.TIMEOUT) else f" (task {status})"
                    failures[site] = (
                        f"site {site} did not answer task {task_name} within {timeout}s at iteration {iteration}{ended}"
                    )
            if aborted:
                self.cancel_all_tasks(fl_ctx=fl_ctx)
                if disconnected:
                    raise SplitRunError("; ".join(failures[site] for site in sorted(disconnected)))
                raise SplitRunAborted(f"aborted while waiting for {task_name} at iteration {iteration}")
            if failures and not self._may_drop(task_name):
                self.cancel_all_tasks(fl_ctx=fl_ctx)
                raise SplitRunError("; ".join(failures[site] for site in sorted(failures)))
            if waiting:
                time.sleep(self.settings.task_check_period)
        for site in sorted(failures):
            self._drop(site, iteration, failures[site], fl_ctx)
        # When each site took its task, from the scheduling: how long FLARE took to hand the tasks out.
        self.last_dispatch_s = {site: at - sent.scheduled_at for site, at in sent.sent_at.items()}
        return {site: from_shareable(reply) for site, reply in replies.items() if site not in failures}

    def _may_drop(self, task_name: str) -> bool:
        return self.settings.on_site_failure == "continue" and task_name != TaskName.SETUP

    def _drop(self, site: str, iteration: int, reason: str, fl_ctx: FLContext) -> None:
        record = self.roster.drop(site, iteration, reason)
        self.record.drop(self.roster.dropped)
        if not self.roster.active:
            raise SplitRunError(f"every site has dropped out; the last: {reason}")
        self.log_warning(
            fl_ctx,
            f"continuing without site {site} ({record['modality']}) from iteration {iteration}: {reason}; "
            f"active: {self.roster.active}",
        )
