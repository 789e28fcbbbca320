"""site.encoder_release: a site's encoder leaves it for averaging only if its own policy says so; without the key the
upload is refused before anything changes, naming the key, and a policy with it lets the same task through."""

from __future__ import annotations

import json

import pytest
from fakes import t1gd_site_context
from nvflare.apis.dxo import from_shareable
from nvflare.apis.signal import Signal

from splitunet.errors import SplitUNetConfigError
from splitunet.flare.encoder_weights import dxo_to_encoder
from splitunet.flare.executor import SplitSiteExecutor
from splitunet.flare.replies import reply_error_message
from splitunet.site.encoder_release import (
    SHARE_ENCODER_KEY,
    EncoderReleaseRefused,
    check_share_encoder,
    read_share_encoder,
)
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MetaKey, TaskName
from splitunet.wire.transport import control_dxo

CONFIG = SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(1, 2, 3))


@pytest.fixture(autouse=True)
def own_settings_only(monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)


def _policy(tmp_path, content) -> object:
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps(content))
    return path


def test_without_the_file_or_the_key_the_encoder_stays(tmp_path):
    assert read_share_encoder(tmp_path / "privacy.json") is False
    assert read_share_encoder(_policy(tmp_path, {"scopes": [], "splitunet_epsilon_cap": {"max_epsilon": 8}})) is False
    assert read_share_encoder(_policy(tmp_path, {SHARE_ENCODER_KEY: False})) is False
    assert read_share_encoder(_policy(tmp_path, {"scopes": [], SHARE_ENCODER_KEY: True})) is True


@pytest.mark.parametrize("value", ["true", 1, None, {"allow": True}])
def test_anything_but_a_boolean_is_refused_naming_file_and_key(tmp_path, value):
    with pytest.raises(SplitUNetConfigError, match=f"local/privacy.json {SHARE_ENCODER_KEY} must be true or false"):
        read_share_encoder(_policy(tmp_path, {SHARE_ENCODER_KEY: value}))


def test_the_refusal_names_the_site_and_the_key_and_no_path():
    check_share_encoder(True, "site-3")
    with pytest.raises(EncoderReleaseRefused) as refused:
        check_share_encoder(False, "site-3")
    message = str(refused.value)
    assert message.startswith("site site-3 refuses to send its encoder for averaging")
    assert f'"{SHARE_ENCODER_KEY}": true' in message and "/" not in message.split("local/privacy.json")[0]


def _run(executor, task, meta, fl_ctx):
    return executor.execute(task, control_dxo(meta).to_shareable(), fl_ctx, Signal())


def _set_up(executor, fl_ctx):
    meta = {MetaKey.CONFIG: CONFIG.to_dict(), MetaKey.EXPERIMENT: "split_unet"}
    assert reply_error_message(_run(executor, TaskName.SETUP, meta, fl_ctx)) is None


def test_a_site_without_the_opt_in_refuses_the_upload(tmp_path, tiny_parties):
    fl_ctx = t1gd_site_context(tmp_path, tiny_parties, {"scopes": []})
    executor = SplitSiteExecutor()
    _set_up(executor, fl_ctx)
    reply = _run(executor, TaskName.AVERAGE, {MetaKey.ITERATION: 10}, fl_ctx)
    message = reply_error_message(reply)
    assert message is not None and "site site-3 refuses to send its encoder for averaging" in message
    assert str(tiny_parties) not in message and "BRATS" not in message


def test_a_site_that_opted_in_sends_its_encoder(tmp_path, tiny_parties):
    fl_ctx = t1gd_site_context(tmp_path, tiny_parties, {"scopes": [], SHARE_ENCODER_KEY: True})
    executor = SplitSiteExecutor()
    _set_up(executor, fl_ctx)
    reply = _run(executor, TaskName.AVERAGE, {MetaKey.ITERATION: 10}, fl_ctx)
    assert reply_error_message(reply) is None
    expected = {name: tuple(value.shape) for name, value in executor.trainer.encoder.state_dict().items()}
    assert dxo_to_encoder(from_shareable(reply), party="site-3", expected=expected).keys() == expected.keys()
