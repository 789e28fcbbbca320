"""SiteTrainer: keyed cases, forward/backward bookkeeping, checkpoints."""

from __future__ import annotations

import pytest
import torch

from splitunet.data.party_data import ModalityFolder
from splitunet.data.sampling import window_plan
from splitunet.errors import SplitUNetDataError
from splitunet.model_config import SplitModelConfig
from splitunet.site.trainer import SiteTrainer

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
    with pytest.raises(RuntimeError, match="pending"):
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
