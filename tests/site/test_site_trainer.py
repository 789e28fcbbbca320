"""SiteTrainer: keyed cases, forward/backward bookkeeping, checkpoints."""

from __future__ import annotations

import pytest
import torch

from splitunet.data.party_data import ModalityFolder
from splitunet.data.sampling import window_plan
from splitunet.errors import SplitUNetDataError
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.model_config import SplitModelConfig

CONFIG = SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(1, 2, 3), learning_rate=1e-2)


@pytest.fixture
def trainer(tiny_parties):
    site = SiteTrainer(ModalityFolder(tiny_parties / "t1gd", "t1gd", party="site-3"), "test-secret")
    site.build(CONFIG)
    return site


def _plan(trainer, flips=(False, True, False)):
    key = sorted(trainer.key_to_case)[0]
    plan = window_plan([key], [[0, 2, 1]], [32, 32, 32])
    plan["flips"] = [list(flips)]
    return plan


def test_server_sees_keys_shapes_and_digests_only(trainer):
    described = trainer.describe_cases()
    assert len(described) == 3
    for key, info in described.items():
        assert len(key) == 32 and "BRATS" not in key
        assert set(info) == {"shape", "affine_digest"}
        assert list(info["shape"]) == [34, 36, 33]


def test_forward_sends_configured_levels_and_backward_steps(trainer):
    features = trainer.forward(_plan(trainer))
    assert sorted(features) == [1, 2, 3, 4]
    assert features[1].shape == (1, 4, 16, 16, 16) and not features[1].requires_grad
    before = [p.detach().clone() for p in trainer.encoder.parameters()]
    trainer.backward({level: torch.ones_like(t) for level, t in features.items()})
    assert trainer.steps_applied == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.encoder.parameters()))


def test_protocol_misuse_is_an_error(trainer):
    with pytest.raises(RuntimeError, match="no forward pass is pending"):
        trainer.backward({4: torch.zeros(1)})
    features = trainer.forward(_plan(trainer))
    trainer.forward(_plan(trainer))  # a pipelined step (pipeline_delay 1): two may be in flight, not three
    with pytest.raises(RuntimeError, match="2 steps' gradients are pending"):
        trainer.forward(_plan(trainer))
    with pytest.raises(ValueError, match="do not match sent levels"):
        trainer.backward({4: features[4]})


def test_unknown_case_key_names_the_site(trainer):
    plan = window_plan(["f" * 32], [[0, 0, 0]], [32, 32, 32])
    with pytest.raises(SplitUNetDataError, match="site-3"):
        trainer.encode(plan)


def test_float16_transport(tiny_parties):
    site = SiteTrainer(ModalityFolder(tiny_parties / "flair", "flair", party="site-1"), "test-secret")
    site.build(SplitModelConfig(features=(4, 4, 8, 8, 16), transfer_dtype="float16"))
    features = site.encode(_plan(site))
    assert all(t.dtype == torch.float16 for t in features.values())


def test_state_dict_round_trip(trainer, tiny_parties):
    features = trainer.forward(_plan(trainer))
    trainer.backward({level: torch.randn_like(t) for level, t in features.items()})
    state = trainer.state_dict()
    other = SiteTrainer(ModalityFolder(tiny_parties / "t1gd", "t1gd", party="site-3"), "test-secret")
    other.build(CONFIG)
    other.load_state_dict(state)
    plan = _plan(trainer)
    for level, tensor in trainer.encode(plan).items():
        torch.testing.assert_close(other.encode(plan)[level], tensor)


def test_site_local_seed_hides_the_initial_encoder_from_the_server(tiny_parties):
    def initial_weights(init_seed=None):
        site = SiteTrainer(ModalityFolder(tiny_parties / "t2", "t2", party="site-4"), "test-secret")
        site.build(CONFIG, init_seed)
        return torch.cat([p.detach().flatten() for p in site.encoder.parameters()])

    from_server_seed = initial_weights()
    assert torch.equal(from_server_seed, initial_weights())  # what the server can rebuild
    own = initial_weights(init_seed=987654)
    assert torch.equal(own, initial_weights(init_seed=987654))
    assert not torch.allclose(own, from_server_seed)


def _conv_output_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    seen = []
    for conv in (m for m in module.modules() if isinstance(m, torch.nn.Conv3d)):
        conv.register_forward_hook(lambda _m, _i, output: seen.append(output.dtype))
    return seen


def test_amp_is_ignored_on_a_cpu(tiny_parties):
    site = SiteTrainer(ModalityFolder(tiny_parties / "t1gd", "t1gd", party="site-3"), "test-secret", amp=True)
    site.build(CONFIG)
    dtypes = _conv_output_dtypes(site.encoder)
    site.forward(_plan(site))
    assert site.amp is False and set(dtypes) == {torch.float32}


def test_amp_wraps_the_training_forward_only_and_sends_the_wire_dtype(trainer):
    # What amp_applies grants on a CUDA device; CPU autocast here only checks where the trainer applies it.
    trainer.amp = True
    dtypes = _conv_output_dtypes(trainer.encoder)
    features = trainer.forward(_plan(trainer))
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert {t.dtype for t in features.values()} == {torch.float32}
    assert {t.dtype for t in trainer._pending.values()} == {torch.bfloat16}
    trainer.backward({level: torch.ones_like(t) for level, t in features.items()})
    assert trainer.steps_applied == 1 and all(p.dtype == torch.float32 for p in trainer.encoder.parameters())
    dtypes.clear()
    trainer.encode(_plan(trainer))  # validation and inference stay float32
    assert set(dtypes) == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_site_trains_under_autocast_and_sends_pinned_host_features(tiny_parties):
    site = SiteTrainer(ModalityFolder(tiny_parties / "t1gd", "t1gd", party="site-3"), "test-secret", "cuda", amp=True)
    site.build(CONFIG)
    features = site.forward(_plan(site))
    assert site.amp is True
    assert all(t.device.type == "cpu" and t.is_pinned() and t.dtype == torch.float32 for t in features.values())
    site.backward({level: torch.full_like(t, 1e-3) for level, t in features.items()})
    assert all(torch.isfinite(p).all() for p in site.encoder.parameters())


def test_crops_features_and_gradients_cross_the_host_staging(trainer, recording_staging):
    trainer.staging = recording_staging
    features = trainer.forward(_plan(trainer))
    trainer.backward({level: torch.ones_like(t) for level, t in features.items()})
    shapes = {level: tuple(t.shape) for level, t in features.items()}
    assert recording_staging.calls == [
        ("to_device", "crops", {0: (1, 1, 32, 32, 32)}),
        ("to_host", "features", shapes),
        ("to_device", "gradients", shapes),
    ]


def test_a_frozen_encoder_keeps_no_graph_and_refuses_gradients(tiny_parties):
    site = SiteTrainer(ModalityFolder(tiny_parties / "t1gd", "t1gd", party="site-3"), "test-secret")
    site.build(SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(1, 2, 3), train_encoders=False))
    features = site.forward(_plan(site))
    assert sorted(features) == [1, 2, 3, 4] and site._pending is None
    site.forward(_plan(site))  # no gradients pending: the next step may encode at once
    with pytest.raises(ValueError, match="site-3: received gradients, but this job freezes the encoders"):
        site.backward({level: torch.ones_like(t) for level, t in features.items()})


def test_sites_sharing_a_modality_send_their_weights_and_take_the_average_keeping_their_optimiser(tiny_parties):
    def site(party):
        trainer = SiteTrainer(ModalityFolder(tiny_parties / "t1gd", "t1gd", party=party), "test-secret")
        trainer.build(CONFIG, init_seed=5)
        return trainer

    first, second = site("site-3"), site("site-7")
    features = first.forward(_plan(first))
    with pytest.raises(RuntimeError, match="site-3: encoder weights asked for while a step's gradients are pending"):
        first.encoder_weights()
    first.backward({level: torch.ones_like(t) for level, t in features.items()})
    moments = {id(p): first.optimizer.state[p]["exp_avg"].clone() for p in first.encoder.parameters()}
    # A copy, not a view: what leaves does not move with later steps.
    sent = first.encoder_weights()
    assert all(not torch.equal(value, second.encoder.state_dict()[name]) for name, value in sent.items())
    average = {name: (value + second.encoder_weights()[name]) / 2 for name, value in sent.items()}
    for trainer in (first, second):
        trainer.load_encoder_weights(average)
        assert trainer.averages_loaded == 1
    plan = _plan(first)
    for level, tensor in first.encode(plan).items():
        torch.testing.assert_close(second.encode(plan)[level], tensor)
    # The optimiser still steps the same parameters, with its own moments.
    assert all(torch.equal(first.optimizer.state[p]["exp_avg"], moments[id(p)]) for p in first.encoder.parameters())
    assert first.state_dict()["averages_loaded"] == 1
    with pytest.raises(ValueError, match="site-3: averaged encoder has other weights: missing"):
        first.load_encoder_weights(dict(list(average.items())[1:]))


def test_a_frozen_encoder_is_never_averaged(tiny_parties):
    site = SiteTrainer(ModalityFolder(tiny_parties / "t1gd", "t1gd", party="site-3"), "test-secret")
    site.build(SplitModelConfig(features=(4, 4, 8, 8, 16), train_encoders=False))
    with pytest.raises(ValueError, match="site-3: this job freezes the encoders"):
        site.encoder_weights()
