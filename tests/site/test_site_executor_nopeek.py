"""flare.executor with NoPeek: the executor's ``nopeek`` reaches the site trainer, a site's minimum ``NoPeek`` refuses
a job that trains its encoder without it (or weaker), and settings that cannot hold are refused when FLARE builds the
executor."""

from __future__ import annotations

import pytest
import torch
from fakes import one_training_step, t1gd_site_context
from nvflare.apis.signal import Signal

from splitunet.errors import SplitUNetConfigError
from splitunet.flare.executor import SplitSiteExecutor
from splitunet.flare.replies import reply_error_message
from splitunet.site.minimum_defense import MINIMUM_DEFENSE_KEY, nopeek_shortfalls
from splitunet.site.nopeek import NoPeekSettings
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MetaKey, TaskName
from splitunet.wire.transport import control_dxo

CONFIG = SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(1, 2, 3))
FLOOR = {"scopes": [], MINIMUM_DEFENSE_KEY: {"NoPeek": {"weight": 0.01}}}


@pytest.fixture(autouse=True)
def own_settings_only(monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)


def _run(executor, task, meta, fl_ctx, dxo=None):
    return executor.execute(task, (dxo or control_dxo(meta)).to_shareable(), fl_ctx, Signal())


def _setup(executor, fl_ctx, config=CONFIG):
    return _run(executor, TaskName.SETUP, {MetaKey.CONFIG: config.to_dict(), MetaKey.EXPERIMENT: "split_unet"}, fl_ctx)


def test_the_site_trains_with_the_jobs_nopeek_and_logs_its_correlations(tmp_path, tiny_parties):
    fl_ctx = t1gd_site_context(tmp_path, tiny_parties, FLOOR)
    executor = SplitSiteExecutor(nopeek={"weight": 0.02, "positions": 32})
    assert reply_error_message(_setup(executor, fl_ctx)) is None
    assert executor.trainer.nopeek.settings == NoPeekSettings(weight=0.02, positions=32)
    features, stepped = one_training_step(executor, fl_ctx, lambda shape: torch.zeros(*shape))
    assert reply_error_message(features) is None
    assert reply_error_message(stepped) is None and executor.trainer.steps_applied == 1
    # Zero gradients from the server: the penalty alone moved the encoder, on every level the site sends.
    assert set(executor.trainer.nopeek.last) == {1, 2, 3, 4}
    assert all(0.0 < value <= 1.0 for value in executor.trainer.nopeek.last.values())


def test_a_site_floor_refuses_a_job_that_trains_without_nopeek_or_weaker(tmp_path, tiny_parties):
    fl_ctx = t1gd_site_context(tmp_path, tiny_parties, FLOOR)
    message = reply_error_message(_setup(SplitSiteExecutor(), fl_ctx))
    assert "site site-3 refuses this job" in message
    assert (
        "the site's encoder training: missing NoPeek(weight >= 0.01): the job trains the encoder without it" in message
    )
    weaker = reply_error_message(_setup(SplitSiteExecutor(nopeek={"weight": 0.001}), fl_ctx))
    assert "NoPeek weight 0.001 (needs >= 0.01)" in weaker


def test_a_frozen_encoder_meets_a_nopeek_floor():
    floor = FLOOR[MINIMUM_DEFENSE_KEY]
    assert nopeek_shortfalls(floor, None, SplitModelConfig(train_encoders=False)) == []
    assert nopeek_shortfalls(floor, NoPeekSettings(weight=0.5), SplitModelConfig()) == []
    assert nopeek_shortfalls({}, None, SplitModelConfig()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nopeek": {"weight": -1}}, "nopeek: weight must be a finite number > 0"),
        ({"nopeek": {"weight": 0.1, "stride": 2}}, r"nopeek: unknown settings \['stride'\]"),
        (
            {"nopeek": {"weight": 0.1}, "dp": {"noise_multiplier": 1.0, "poisson_sampling": False}, "dp_steps": 3},
            "nopeek and dp cannot be combined",
        ),
    ],
)
def test_malformed_nopeek_arguments_are_named_when_flare_builds_the_executor(kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        SplitSiteExecutor(**kwargs)
