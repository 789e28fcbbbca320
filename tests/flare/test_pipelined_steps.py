"""Pipelined training steps (``pipeline_delay``): the workflow's training loop, driven in one process.

An in-process communicator stands in for FLARE's: a task sent to a site runs there at once, through the site
executor's own ``execute`` on the task data after a FOBS round trip (and, where given, the job's filters on both
sides), and its reply goes back through FLARE's result callback. The workflow (:class:`SplitLearningController`), the
site executor and both trainers are the real ones; validation and saving are replaced by probes, since pipelining
changes neither (it only has to leave nothing in flight when they run).
"""

from __future__ import annotations

import time

import pytest
import torch
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.fuel.utils import fobs

from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.data.sampling import window_plan
from splitunet.errors import SplitUNetConfigError
from splitunet.filters import QuantizeFeatures
from splitunet.flare.controller import SplitLearningController
from splitunet.flare.executor import SplitSiteExecutor
from splitunet.server.cohorts import Cohort
from splitunet.server.decoder_inputs import modality_groups
from splitunet.server.site_roster import SiteRoster
from splitunet.server.trainer import ServerTrainer
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.protocol import MetaKey
from splitunet.wire.transport import control_dxo, register_tensor_support

SECRET = "test-secret"
SITES = {"site-1": "flair", "site-2": "t1gd"}  # two sites: every task goes to several
CROP = [32, 32, 32]
ITERATIONS, VAL_EVERY = 4, 2  # drains after steps 2 and 4: the pipeline fills and empties twice
WORKFLOW = {
    "num_iterations": ITERATIONS,
    "val_every": VAL_EVERY,
    "batch_size": 1,
    "crop_size": CROP,
    "features": [4, 8, 8, 16, 16],
    "skip_levels": [1, 2, 3],
    "learning_rate": 5e-3,
    "seed": 3,
    "analytics": False,
}


class InProcessSites:
    """FLARE's task communicator as the workflow uses it: each task runs at its site as soon as it is sent.

    Args:
        executors: site -> its executor.
        data_filters: what the server applies to the task data it sends (gradients).
        result_filters: what the sites apply to the results they send (activations).
    """

    def __init__(self, executors, data_filters=(), result_filters=()):
        self.executors = executors
        self.data_filters, self.result_filters = data_filters, result_filters

    def _fl_ctx(self, site: str) -> FLContext:
        fl_ctx = FLContext()
        fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
        return fl_ctx

    def _through(self, shareable, filters, fl_ctx):
        for each in filters:
            shareable = each.process(shareable, fl_ctx)
        return fobs.loads(fobs.dumps(shareable))

    def send(self, task, fl_ctx, targets, send_order, task_assignment_timeout):
        [site] = targets
        site_ctx = self._fl_ctx(site)
        data = self._through(task.data, self.data_filters, site_ctx)
        result = self.executors[site].execute(task.name, data, site_ctx, Signal())
        client_task = ClientTask(Client(site, None), task)
        client_task.task_sent_time = time.time()
        client_task.result = self._through(result, self.result_filters, site_ctx)
        task.result_received_cb(client_task=client_task, fl_ctx=fl_ctx)

    def cancel_task(self, task, completion_status, fl_ctx):
        raise AssertionError(f"task {task.name} cancelled")

    def cancel_all_tasks(self, completion_status, fl_ctx):
        raise AssertionError("tasks cancelled")

    def get_client_disconnect_time(self, client_name):
        return None


class CallLog:
    """Records each site trainer's forward and backward calls in order, as ``(site, "F" or "B")``."""

    def __init__(self):
        self.calls = []
        self.most_in_flight = 0

    def watch(self, site: str, trainer: SiteTrainer) -> None:
        forward, backward = trainer.forward, trainer.backward

        def logged_forward(plan):
            features = forward(plan)
            self.calls.append((site, "F"))
            self.most_in_flight = max(self.most_in_flight, trainer.steps_in_flight)
            return features

        def logged_backward(grads):
            backward(grads)
            self.calls.append((site, "B"))

        trainer.forward, trainer.backward = logged_forward, logged_backward

    def of(self, site: str) -> str:
        return "".join(call for name, call in self.calls if name == site)


class FixedPlanner:
    """The same crop every step (the workflow's planner as the loop uses it): the loss then falls in a few steps."""

    def __init__(self, server):
        key = sorted(server.key_to_case)[0]
        self.plan = {**window_plan([key], [[0, 2, 1]], CROP), "flips": [[False, True, False]]}

    def next_plan(self, available=None):
        return 0, dict(self.plan)


def _parties(tiny_parties, config, delay=0):
    """Fresh site trainers (in decoder order) and server trainer, built from ``config``."""
    sites = {}
    for site, modality in SITES.items():
        sites[site] = SiteTrainer(ModalityFolder(tiny_parties / modality, modality, party=site), SECRET)
        sites[site].build(config)
    server = ServerTrainer(LabelFolder(tiny_parties / "labels", party="server"), SECRET, pipeline_delay=delay)
    server.build(config, num_sites=len(sites))
    return sites, server


def _train(tiny_parties, delay, filters=()):
    """Run the workflow's training loop; returns ``(controller, sites, log, drains)``."""
    controller = SplitLearningController(**WORKFLOW, pipeline_delay=delay)
    sites, server = _parties(tiny_parties, controller.model_config, delay)
    executors, log = {}, CallLog()
    for site, trainer in sites.items():
        log.watch(site, trainer)
        executors[site] = SplitSiteExecutor(device="cpu")
        executors[site].trainer = trainer
    register_tensor_support()
    controller.communicator = InProcessSites(executors, filters, filters)
    controller.site_modality = dict(SITES)
    controller.groups = modality_groups(controller.site_modality)
    controller.sites = list(sites)
    controller.roster = SiteRoster(controller.sites, controller.site_modality)
    controller.trainer = server
    controller.cohorts = [Cohort(tuple(controller.sites), tuple(sorted(server.key_to_case)), ())]
    controller.record.start()
    drains = []

    def probe(*args, **kwargs):
        # Validation and saving: every step's gradients must have been applied at every site.
        drains.append({site: (trainer.steps_in_flight, trainer.steps_applied) for site, trainer in sites.items()})
        return False

    controller._validate, controller._save = probe, probe
    controller._train_steps(FixedPlanner(server), None, 1, FLContext(), Signal(), out_dir=None)
    return controller, sites, log, drains


def _lock_step_reference(tiny_parties):
    """The lock-step protocol by hand (docs/design.md, "Parties and one iteration"): each site applies the gradients
    of step t, then encodes step t+1; before each validation the pending gradients are applied."""
    sites, server = _parties(tiny_parties, SplitLearningController(**WORKFLOW).model_config)
    planner, pending = FixedPlanner(server), {}
    for iteration in range(1, ITERATIONS + 1):
        _, plan = planner.next_plan()
        features = []
        for site, trainer in sites.items():
            if site in pending:
                trainer.backward(pending[site])
            features.append(trainer.forward(plan))
        pending = dict(zip(sites, server.train_step(plan, features).grads))
        if iteration % VAL_EVERY == 0 or iteration == ITERATIONS:
            for site, trainer in sites.items():
                trainer.backward(pending.pop(site))
    return sites, server


def _weights(sites, server):
    weights = {f"server.{name}": value for name, value in server.decoder.state_dict().items()}
    for site, trainer in sites.items():
        weights.update({f"{site}.{name}": value for name, value in trainer.encoder.state_dict().items()})
    return weights


@pytest.fixture(scope="module")
def runs(tiny_parties):
    """Lock-step by hand, the workflow lock-step and pipelined, and pipelined with the main job's int8 codes."""
    int8 = [QuantizeFeatures(precision="int8")]
    threads = torch.get_num_threads()
    # One thread, as each FLARE party gets: on a busy machine, OpenMP threads waiting for a descheduled peer stretch
    # these tiny steps several times over.
    torch.set_num_threads(1)
    try:
        return {
            "by hand": _lock_step_reference(tiny_parties),
            0: _train(tiny_parties, delay=0),
            1: _train(tiny_parties, delay=1),
            "1 int8": _train(tiny_parties, delay=1, filters=int8),
        }
    finally:
        torch.set_num_threads(threads)


# Drains after steps 2 and 4, each a validation and a save: nothing in flight, every step applied.
DRAINED = [(0, 2), (0, 2), (0, 4), (0, 4)]


def test_pipelined_training_equals_lock_step_when_the_delay_is_0(runs):
    controller, sites, log, drains = runs[0]
    expected, got = _weights(*runs["by hand"]), _weights(sites, controller.trainer)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # Lock-step: every forward's gradients come back before the next forward.
    assert log.of("site-1") == "FB" * ITERATIONS and log.most_in_flight == 1
    assert [drain["site-1"] for drain in drains] == DRAINED


@pytest.mark.parametrize("run", [1, "1 int8"])
def test_with_delay_1_a_site_applies_step_t_after_encoding_step_t_plus_1(runs, run):
    controller, sites, log, drains = runs[run]
    # F1 F2 B1 | B2 (drain) F3 F4 B3 | B4 (drain): the gradients of step t come with the task of step t+2, and the
    # pipeline empties before every validation and save.
    for site in SITES:
        assert log.of(site) == ("FF" + "B" + "B") * 2, site
    assert log.most_in_flight == 2
    assert [drain["site-2"] for drain in drains] == DRAINED
    assert len(controller.record.loss_curve) == ITERATIONS


def test_with_delay_1_training_differs_from_lock_step(runs):
    losses = {delay: runs[delay][0].record.loss_curve for delay in (0, 1)}
    # The first step is the same either way; from the second on, the pipelined sites encode before taking the
    # gradients of the step before.
    assert losses[1][0] == pytest.approx(losses[0][0], abs=1e-6)
    assert all(late != pytest.approx(lock, abs=1e-6) for late, lock in zip(losses[1][1:], losses[0][1:]))
    lock_step, pipelined = (_weights(runs[delay][1], runs[delay][0].trainer) for delay in (0, 1))
    assert any(not torch.allclose(pipelined[name], lock_step[name]) for name in lock_step if name.startswith("site"))


@pytest.mark.parametrize("run", [1, "1 int8"])
def test_with_delay_1_training_still_lowers_the_loss_on_a_fixed_batch(runs, run):
    losses = runs[run][0].record.loss_curve
    assert max(losses[-2:]) < losses[0]


def test_a_site_with_dp_sgd_refuses_a_pipelined_step(tiny_parties):
    pytest.importorskip("opacus")
    from splitunet.dp.dp_settings import DPSettings

    sites, server = _parties(tiny_parties, SplitLearningController(**WORKFLOW).model_config)
    trainer = sites["site-1"]
    trainer.plan_privacy(DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False), steps=5)
    _, plan = FixedPlanner(server).next_plan()
    trainer.forward(plan)
    with pytest.raises(SplitUNetConfigError, match="DP-SGD trains lock-step only"):
        trainer.forward(plan)


def test_a_site_refuses_to_save_with_a_step_in_flight(tiny_parties):
    sites, server = _parties(tiny_parties, SplitLearningController(**WORKFLOW).model_config)
    executor = SplitSiteExecutor(device="cpu")
    executor.trainer = sites["site-1"]
    _, plan = FixedPlanner(server).next_plan()
    executor.trainer.forward(plan)
    with pytest.raises(RuntimeError, match="1 training steps' gradients are still pending"):
        executor._save(control_dxo({MetaKey.TAG: "last", MetaKey.ITERATION: 1}), "site-1", None)
