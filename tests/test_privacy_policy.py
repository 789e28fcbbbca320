"""The example site privacy policy (poc/privacy.json) loads in FLARE and its scopes hold what they promise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.private.fed.app.fl_conf import create_privacy_manager
from nvflare.private.privacy_manager import PrivacyManager

from splitunet.filters import (
    BlockSkipLevels,
    ChannelDropout,
    ClippedGaussianNoise,
    FeatureGuard,
    GradientDetector,
    QuantizeFeatures,
)
from splitunet.flare.site_minimum import read_minimum_defense
from splitunet.site.minimum_defense import shortfalls
from splitunet.tools.deployment import bundle_root
from splitunet.wire.protocol import SITE_ERROR_HEADER, DataKind
from splitunet.wire.transport import dxo_to_features, features_to_dxo, register_tensor_support

POLICY = bundle_root() / "poc" / "privacy.json"


@pytest.fixture(scope="module")
def manager(tmp_path_factory) -> PrivacyManager:
    """The policy loaded as a site's FLARE client loads its ``local/privacy.json``."""
    site = tmp_path_factory.mktemp("site-1")
    (site / "local").mkdir()
    (site / "startup").mkdir()
    shutil.copy(POLICY, site / "local" / "privacy.json")
    return create_privacy_manager(Workspace(str(site), "site-1"), names_only=False)


def _result_filters(manager, scope: str):
    filters = manager.get_scope(scope).task_result_filters
    return [type(f) for f in filters.get("out", [])]


def test_scopes_and_their_filters_in_order(manager):
    assert manager.default_scope.name == "standard"
    assert _result_filters(manager, "minimum") == [ClippedGaussianNoise, FeatureGuard]
    assert _result_filters(manager, "standard") == [ClippedGaussianNoise, QuantizeFeatures, FeatureGuard]
    assert _result_filters(manager, "strict") == [
        BlockSkipLevels,
        ChannelDropout,
        ClippedGaussianNoise,
        QuantizeFeatures,
        FeatureGuard,
    ]


def test_every_scope_meets_the_policys_own_minimum_defense(manager):
    # FLARE lets a job name any scope a site defines: each must hold the site's floor.
    minimum = read_minimum_defense(POLICY.parent)
    assert minimum == {"ClippedGaussianNoise": {"clip_rms": 1.0, "noise_multiplier": 0.0005}}
    for scope in manager.name_to_scopes.values():
        assert shortfalls(minimum, scope.task_result_filters.get("out", [])) == [], scope.name


def test_a_scope_below_the_minimum_is_found(manager):
    minimum = read_minimum_defense(POLICY.parent)
    weaker = {**minimum, "ClippedGaussianNoise": {"noise_multiplier": 0.01}}
    assert shortfalls(weaker, manager.get_scope("minimum").task_result_filters["out"])


def test_strict_scope_output_is_what_the_decoder_can_use(manager):
    register_tensor_support()
    features = {level: torch.randn(2, 4, *(32 // 2**level,) * 3) for level in range(5)}
    shareable = features_to_dxo(features, DataKind.ACTIVATIONS, {"iteration": 1}).to_shareable()
    for filter_ in manager.get_scope("strict").task_result_filters["out"]:
        shareable = filter_.process(shareable, FLContext())
    received = dxo_to_features(from_shareable(shareable), DataKind.ACTIVATIONS, expected_levels=[1, 2, 3, 4])
    assert all(t.dtype == torch.float16 for t in received.values())
    assert not torch.allclose(received[1].float(), features[1], atol=1e-2)


def test_every_scope_checks_the_gradients_the_server_returns(manager):
    # The detector protects the site against the server, so it lives in the site's policy, where no job removes it.
    for scope in manager.name_to_scopes.values():
        data_filters = scope.task_data_filters.get("in", [])
        assert [type(f) for f in data_filters] == [FeatureGuard, GradientDetector], scope.name
    register_tensor_support()
    generator = torch.Generator().manual_seed(0)
    pyramid = {level: torch.randn(1, 8 * 2**level, *(48 // 2**level,) * 3, generator=generator) for level in range(5)}
    # Per-channel constants on x0 (a pooled critic's gradient), at an honest scale: refused by the DC share.
    pooled = {**pyramid, 0: pyramid[0].mean(dim=(2, 3, 4), keepdim=True).expand_as(pyramid[0]) * 100}
    for grads, refused in ((pyramid, False), (pooled, True)):
        shareable = features_to_dxo(dict(grads), DataKind.GRADIENTS, {"iteration": 1}).to_shareable()
        for filter_ in manager.get_scope("standard").task_data_filters["in"]:
            shareable = filter_.process(shareable, FLContext())
        reason = shareable.get_header(SITE_ERROR_HEADER)
        assert (reason is not None and "dc_fraction x0" in reason) if refused else reason is None, reason


def test_the_example_policy_keeps_each_sites_encoder_at_the_site():
    from splitunet.site.encoder_release import read_share_encoder

    assert read_share_encoder(POLICY) is False
    assert json.loads(POLICY.read_text())["splitunet_share_encoder"] is False  # stated, so admins see the switch
