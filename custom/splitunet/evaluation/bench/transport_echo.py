"""The FLARE side of the transport arm (:mod:`splitunet.evaluation.bench.transport`): an echo workflow and executor.

Kept apart so that the benchmark imports nvflare only when it makes a FLARE run.
"""

from __future__ import annotations

import time

import torch
from nvflare.apis.controller_spec import Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import make_reply

from splitunet.atomic_files import write_json_atomic
from splitunet.evaluation.bench.transport import (
    SITE_SECONDS_HEADER,
    TRANSPORT_RESULTS,
    TRANSPORT_TASK,
    make_payload,
    message_bytes,
)
from splitunet.flare.task_long_poll import TaskLongPoll
from splitunet.flare.workspace_paths import run_dir
from splitunet.wire.transport import register_tensor_support

__all__ = ["TransportEchoController", "TransportEchoExecutor"]


class TransportEchoController(Controller):
    """Sends every site one step's gradient tensors per round and waits for its same-sized answer.

    Writes ``transport.json`` in the server's run folder: per round its seconds from scheduling the tasks to the
    last reply, the bytes each way, the slowest hand-out and the slowest site's own time.

    Args:
        layout: name -> shape of one site's message (:func:`~splitunet.evaluation.bench.transport.step_layout`).
        packed: send one ``uint8`` buffer of the same bytes instead.
        rounds: rounds after the warm-up.
        warmup_rounds: rounds run first and marked as warm-up.
        timeout_s: longest wait of one round.
        long_poll_s: hold the sites' task requests as the split job does (``task_long_poll_s``; 0: off).
    """

    def __init__(
        self,
        layout: dict,
        packed: bool = False,
        rounds: int = 3,
        warmup_rounds: int = 1,
        timeout_s: float = 900.0,
        long_poll_s: float = 30.0,
    ):
        super().__init__(task_check_period=0.005)
        register_tensor_support()
        self.layout, self.packed = layout, bool(packed)
        self.rounds, self.warmup_rounds = int(rounds), int(warmup_rounds)
        self.timeout_s = float(timeout_s)
        self.long_poll_s = float(long_poll_s)
        self._long_poll = None

    def start_controller(self, fl_ctx):
        if self.long_poll_s > 0:
            self._long_poll = TaskLongPoll(self.long_poll_s)
            if not self._long_poll.install(fl_ctx):
                self._long_poll = None

    def stop_controller(self, fl_ctx):
        if self._long_poll is not None:
            self._long_poll.uninstall()

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx):
        pass

    def control_flow(self, abort_signal, fl_ctx):
        sites = sorted(client.name for client in fl_ctx.get_engine().get_clients())
        generator = torch.Generator().manual_seed(0)
        rounds, error = [], None
        try:
            for index in range(self.warmup_rounds + self.rounds):
                rounds.append(self._one_round(index, sites, generator, fl_ctx, abort_signal))
        except Exception as exc:  # the report says what failed
            error = f"{type(exc).__name__}: {exc}"
        write_json_atomic({"sites": sites, "rounds": rounds, "error": error}, run_dir(fl_ctx) / TRANSPORT_RESULTS)

    def _one_round(self, index, sites, generator, fl_ctx, abort_signal) -> dict:
        replies, sent_at = {}, {}

        def on_result(client_task, fl_ctx):
            replies[client_task.client.name] = client_task.result
            sent_at[client_task.client.name] = client_task.task_sent_time

        payloads = {site: make_payload(self.layout, self.packed, generator) for site in sites}
        start, scheduled = time.perf_counter(), time.time()
        tasks = {}
        for site in sites:
            data = DXO(DataKind.WEIGHTS, payloads[site], meta={"round": index}).to_shareable()
            tasks[site] = Task(TRANSPORT_TASK, data, timeout=int(self.timeout_s), result_received_cb=on_result)
            self.send(tasks[site], fl_ctx, targets=[site])
        if self._long_poll is not None:
            self._long_poll.notify()
        deadline = time.monotonic() + self.timeout_s
        while len(replies) < len(sites):
            ended = [site for site, task in tasks.items() if task.completion_status is not None and site not in replies]
            if ended or abort_signal.triggered or time.monotonic() > deadline:
                self.cancel_all_tasks(fl_ctx=fl_ctx)
                raise RuntimeError(f"round {index}: {len(replies)} of {len(sites)} sites answered; ended: {ended}")
            time.sleep(0.005)
        seconds = time.perf_counter() - start
        for site, reply in replies.items():
            if reply.get_return_code() != ReturnCode.OK:
                raise RuntimeError(f"round {index}: {site} answered {reply.get_return_code()}")
        received = {site: from_shareable(reply) for site, reply in replies.items()}
        return {
            "round": index,
            "warmup": index < self.warmup_rounds,
            "seconds": seconds,
            "bytes_down": sum(message_bytes(payload) for payload in payloads.values()),
            "bytes_up": sum(message_bytes(dxo.data) for dxo in received.values()),
            "hand_out_s": max((at - scheduled for at in sent_at.values() if at is not None), default=0.0),
            "site_s": max(float(reply.get_header(SITE_SECONDS_HEADER) or 0.0) for reply in replies.values()),
        }


class TransportEchoExecutor(Executor):
    """Answers the echo task with fresh random tensors of the received layout, timing its own part."""

    def __init__(self):
        super().__init__()
        # Before the first task arrives: its tensors are decoded on receipt.
        register_tensor_support()
        self.generator = torch.Generator().manual_seed(1)

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        start = time.perf_counter()
        if task_name != TRANSPORT_TASK:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        answer = {}
        # Every tensor is read: a lazily downloaded payload is complete only then.
        for name, tensor in from_shareable(shareable).data.items():
            if tensor.is_floating_point():
                answer[name] = torch.rand(tensor.shape, generator=self.generator)
            else:
                answer[name] = torch.randint(0, 256, tuple(tensor.shape), dtype=tensor.dtype, generator=self.generator)
        reply = DXO(DataKind.WEIGHTS, answer).to_shareable()
        reply.set_header(SITE_SECONDS_HEADER, time.perf_counter() - start)
        return reply
