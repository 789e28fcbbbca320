"""flare.executor with DP-SGD: at the training setup task, before its case list leaves, a site projects the job's
epsilon over ``dp_steps`` and refuses the job (and every later task) when its own max_epsilon is lower or when the job
has no DP-SGD, naming only the cap and the projection; otherwise it records the epsilon spent in its results.json."""

from __future__ import annotations

import json

import pytest
import torch
from fakes import one_training_step, t1gd_site_context
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from splitunet.errors import SplitUNetConfigError
from splitunet.flare.executor import RESULTS_FILE, SplitSiteExecutor
from splitunet.flare.replies import reply_error_message
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MetaKey, TaskName
from splitunet.wire.transport import control_dxo

CONFIG = SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(1, 2, 3))
DP = {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "poisson_sampling": False}
STEPS = 3


@pytest.fixture(autouse=True)
def own_settings_only(monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)


def _context(tmp_path, tiny_parties, cap: dict | None) -> FLContext:
    return t1gd_site_context(
        tmp_path, tiny_parties, None if cap is None else {"scopes": [], "splitunet_epsilon_cap": cap}
    )


def _run(executor, task, meta, fl_ctx, dxo=None):
    shareable = (dxo or control_dxo(meta)).to_shareable()
    return executor.execute(task, shareable, fl_ctx, Signal())


def _setup(executor, fl_ctx):
    return _run(executor, TaskName.SETUP, {MetaKey.CONFIG: CONFIG.to_dict(), MetaKey.EXPERIMENT: "split_unet"}, fl_ctx)


def test_a_job_above_the_cap_is_refused_before_the_case_list_leaves_naming_only_cap_and_projection(
    tmp_path, tiny_parties
):
    fl_ctx = _context(tmp_path, tiny_parties, {"max_epsilon": 1.0})
    executor = SplitSiteExecutor(dp=DP, dp_steps=STEPS)
    reply = _setup(executor, fl_ctx)
    message = reply_error_message(reply)
    budget = executor.trainer.private.budget
    assert message.startswith("site-3: site site-3 refuses this job: its projected epsilon")
    assert f"{budget.epsilon:.4g} at delta 1e-05" in message and "cap max_epsilon 1 " in message
    assert f"sample rate 1, {STEPS} steps" in message
    # No case list, no case ID, no path: the reply is the refusal alone.
    assert reply.get(MetaKey.CASES) is None and "BRATS" not in message and str(tiny_parties) not in message
    assert not (tmp_path / "workspace" / "job-1" / RESULTS_FILE).exists()
    # Every later task is refused the same way, before any crop is read.
    later = _run(executor, TaskName.STEP, {MetaKey.ITERATION: 1, MetaKey.PLAN: None}, fl_ctx)
    assert reply_error_message(later) == message and executor.trainer.steps_applied == 0


def test_a_site_with_a_cap_refuses_a_training_job_without_dp(tmp_path, tiny_parties):
    fl_ctx = _context(tmp_path, tiny_parties, {"max_epsilon": 8})
    message = reply_error_message(_setup(SplitSiteExecutor(), fl_ctx))
    assert "trains without DP-SGD, so its epsilon is unbounded (inf), above the site's cap max_epsilon 8" in message


def test_a_job_within_the_cap_trains_and_records_the_epsilon_spent(tmp_path, tiny_parties):
    fl_ctx = _context(tmp_path, tiny_parties, {"max_epsilon": 1e6})
    executor = SplitSiteExecutor(dp=DP, dp_steps=STEPS)
    reply = _setup(executor, fl_ctx)
    assert reply_error_message(reply) is None
    results_path = tmp_path / "workspace" / "job-1" / RESULTS_FILE
    admitted = json.loads(results_path.read_text())["dp"]
    budget = executor.trainer.private.budget
    assert admitted["budget"]["steps"] == STEPS and admitted["budget"]["sample_rate"] == 1.0
    assert admitted["epsilon"] == 0.0 and admitted["site_cap"] == {"max_epsilon": 1e6, "delta": None}
    features, stepped = one_training_step(executor, fl_ctx, lambda shape: torch.randn(*shape))
    assert reply_error_message(features) is None
    assert reply_error_message(stepped) is None and executor.trainer.private.steps_taken == 1
    saved = _run(executor, TaskName.SAVE, {MetaKey.TAG: "last", MetaKey.ITERATION: 1}, fl_ctx)
    assert reply_error_message(saved) is None
    record = json.loads(results_path.read_text())
    assert record["party"] == "site-3" and record["modality"] == "t1gd" and record["steps_applied"] == 1
    spent = budget.epsilon_at(budget.delta, steps=1)
    assert record["dp"]["epsilon"] == pytest.approx(spent, rel=1e-12) and record["dp"]["steps"] == 1
    assert record["dp"]["epsilon_per_round"] == [{"iteration": 1, "steps": 1, "epsilon": record["dp"]["epsilon"]}]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dp": DP}, "dp_steps must be an int >= 1 with dp"),
        ({"dp_steps": 10}, "dp_steps 10 is set, but the job has no dp settings"),
        ({"dp": DP, "dp_steps": 10, "amp": True}, "amp and dp cannot be combined"),
        ({"dp": {**DP, "poisson_sampling": True}, "dp_steps": 10}, "set poisson_sampling false"),
        ({"dp": {**DP, "accountant": "moments"}, "dp_steps": 10}, "dp: accountant must be one of"),
    ],
)
def test_malformed_dp_arguments_are_named_when_flare_builds_the_executor(kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        SplitSiteExecutor(**kwargs)


def test_a_site_without_opacus_refuses_a_dp_job_when_flare_builds_it(monkeypatch):
    from splitunet.flare import executor as module

    monkeypatch.setattr(module, "opacus_installed", lambda: False)
    with pytest.raises(SplitUNetConfigError, match=r"needs Opacus: pip install 'splitunet\[dp\]'"):
        SplitSiteExecutor(dp=DP, dp_steps=STEPS)
    SplitSiteExecutor()  # the job without DP-SGD needs no Opacus
