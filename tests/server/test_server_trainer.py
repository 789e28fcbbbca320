"""ServerTrainer with SiteTrainers in one process: the split step without FLARE learns and validates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.data.sampling import RandomCropPlanner
from splitunet.server.trainer import ServerTrainer
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES

SECRET = "test-secret"
CONFIG = SplitModelConfig(features=(4, 8, 8, 16, 16), learning_rate=5e-3, seed=2)


def _build(tiny_parties, config):
    sites = []
    for index, modality in enumerate(MODALITIES):
        site = SiteTrainer(ModalityFolder(tiny_parties / modality, modality, party=f"site-{index + 1}"), SECRET)
        site.build(config)
        sites.append(site)
    server = ServerTrainer(LabelFolder(tiny_parties / "labels", party="server"), SECRET)
    server.build(config, num_sites=len(sites))
    return sites, server


@pytest.fixture
def parties(tiny_parties):
    torch.manual_seed(0)
    return _build(tiny_parties, CONFIG)


def test_site_and_server_agree_on_keys_and_alignment(parties):
    sites, server = parties
    for site in sites:
        assert site.describe_cases() == server.describe_cases()


def test_split_training_reduces_the_loss(parties):
    sites, server = parties
    shapes = {key: info["shape"] for key, info in server.describe_cases().items()}
    planner = RandomCropPlanner(shapes, (32, 32, 32), batch_size=2, seed=0, flip_prob=0.0)
    fixed_plan = planner.next_plan()
    losses = []
    for _ in range(12):
        step = server.train_step(fixed_plan, [site.forward(fixed_plan) for site in sites])
        for site, grads in zip(sites, step.grads):
            assert {level: g.shape for level, g in grads.items()} == {
                level: t.shape for level, t in site._pending.items()
            }
            site.backward(grads)
        losses.append(step.loss)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_sliding_window_validation_covers_odd_whole_volumes(parties):
    sites, server = parties
    shapes = {key: info["shape"] for key, info in server.describe_cases().items()}
    key = sorted(shapes)[0]
    calls = []

    def encode(plan):
        calls.append(plan)
        return [site.encode(plan) for site in sites]

    probabilities = server.infer_volume(key, shapes[key], encode, roi_size=(32, 32, 32), sw_batch_size=2)
    assert probabilities.shape == (3, *shapes[key])
    assert 0.0 <= float(probabilities.min()) and float(probabilities.max()) <= 1.0
    origins = [tuple(o) for plan in calls for o in plan["origins"]]
    # Windows start inside the volume and together reach its far corner on every axis.
    assert all(min(o) >= 0 for o in origins)
    assert all(max(o[axis] for o in origins) + 32 == shapes[key][axis] for axis in range(3))

    dice, kept = server.validate(sorted(shapes)[:2], shapes, encode, (32, 32, 32), keep=[key])
    assert set(dice) == {"TC", "WT", "ET", "mean"}
    assert all(0.0 <= value <= 1.0 for value in dice.values())
    assert kept[key].shape == probabilities.shape


def test_mean_fusion_trains_with_a_site_absent(tiny_parties):
    sites, server = _build(tiny_parties, SplitModelConfig(features=(4, 8, 8, 16, 16), fusion="mean", seed=2))
    shapes = {key: info["shape"] for key, info in server.describe_cases().items()}
    plan = RandomCropPlanner(shapes, (32, 32, 32), batch_size=1, seed=0).next_plan()
    features = [site.forward(plan) if index != 2 else None for index, site in enumerate(sites)]
    step = server.train_step(plan, features)
    assert np.isfinite(step.loss)
    assert step.grads[2] is None and all(g is not None for i, g in enumerate(step.grads) if i != 2)
    assert server.decode(features).shape == (1, 3, 32, 32, 32)


def _fixed_plan(server):
    shapes = {key: info["shape"] for key, info in server.describe_cases().items()}
    return RandomCropPlanner(shapes, (32, 32, 32), batch_size=2, seed=0, flip_prob=0.0).next_plan()


def test_amp_decodes_in_bfloat16_and_returns_wire_dtype_gradients(tiny_parties):
    sites, _ = _build(tiny_parties, CONFIG)
    server = ServerTrainer(LabelFolder(tiny_parties / "labels", party="server"), SECRET, amp=True)
    assert server.amp is False  # AMP is for CUDA devices: a CPU server trains in float32
    server.amp = True  # what amp_applies grants on CUDA; CPU autocast here only checks where it is applied
    server.build(CONFIG, num_sites=len(sites))
    seen = []
    for conv in (m for m in server.decoder.modules() if isinstance(m, torch.nn.Conv3d)):
        conv.register_forward_hook(lambda _m, _i, output: seen.append(output.dtype))
    plan = _fixed_plan(server)
    step = server.train_step(plan, [site.forward(plan) for site in sites])
    assert seen and set(seen) == {torch.bfloat16}
    assert np.isfinite(step.loss)
    assert {g.dtype for grads in step.grads for g in grads.values()} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in server.decoder.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_server_returns_pinned_host_gradients(tiny_parties):
    sites, _ = _build(tiny_parties, CONFIG)
    server = ServerTrainer(LabelFolder(tiny_parties / "labels", party="server"), SECRET, "cuda", amp=True)
    server.build(CONFIG, num_sites=len(sites))
    plan = _fixed_plan(server)
    step = server.train_step(plan, [site.forward(plan) for site in sites])
    assert server.amp is True and np.isfinite(step.loss)
    for grads in step.grads:
        assert all(g.device.type == "cpu" and g.is_pinned() and torch.isfinite(g).all() for g in grads.values())


def test_features_targets_and_gradients_cross_the_host_staging(parties, recording_staging):
    sites, server = parties
    server.staging = recording_staging
    plan = _fixed_plan(server)
    sent = [site.forward(plan) for site in sites]
    server.train_step(plan, sent)
    shapes = [{level: tuple(t.shape) for level, t in features.items()} for features in sent]
    tags = [f"site{index}" for index in range(len(sites))]
    assert recording_staging.calls == [
        *[("to_device", tag, shape) for tag, shape in zip(tags, shapes)],
        ("to_device", "target", {0: (2, 3, 32, 32, 32)}),
        *[("to_host", tag, shape) for tag, shape in zip(tags, shapes)],
    ]


def test_frozen_encoders_get_no_gradients_and_the_decoder_still_learns(tiny_parties):
    torch.manual_seed(0)
    frozen = SplitModelConfig(features=(4, 8, 8, 16, 16), learning_rate=5e-3, seed=2, train_encoders=False)
    sites, server = _build(tiny_parties, frozen)
    shapes = {key: info["shape"] for key, info in server.describe_cases().items()}
    fixed_plan = RandomCropPlanner(shapes, (32, 32, 32), batch_size=2, seed=0, flip_prob=0.0).next_plan()
    encoders_before = [[p.detach().clone() for p in site.encoder.parameters()] for site in sites]
    losses = []
    for _ in range(12):
        step = server.train_step(fixed_plan, [site.forward(fixed_plan) for site in sites])
        assert step.grads == [None] * len(sites)
        losses.append(step.loss)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    for site, before in zip(sites, encoders_before):
        assert all(torch.equal(b, p) for b, p in zip(before, site.encoder.parameters()))
