"""FedProx at a SplitFed site: after an average taken with ``fedprox_mu`` > 0 the encoder's applied gradient is the
server's plus ``mu (w - w_anchor)``, also with DP-SGD (added after the clipping and noise, unclipped); nothing before
the first average or at mu = 0; the anchor survives a checkpoint; the executor takes mu from the average's meta."""

from __future__ import annotations

import math

import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext

from splitunet.data.party_data import ModalityFolder
from splitunet.dp import DPSettings
from splitunet.flare.encoder_weights import encoder_to_dxo
from splitunet.flare.executor import SplitSiteExecutor
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MetaKey

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(1, 2, 3), learning_rate=1e-2)
MU = 0.5
CLIP = 0.01


@pytest.fixture
def folder(tiny_parties):
    return ModalityFolder(tiny_parties / "t1gd", "t1gd", party="site-3")


def _trainer(folder, private: bool = False) -> SiteTrainer:
    trainer = SiteTrainer(folder, "test-secret")
    trainer.build(CONFIG, init_seed=5)
    if private:
        # Noise far below the proximal gradient, clipping far below it too: what is added unclipped shows.
        settings = DPSettings(noise_multiplier=1e-9, max_grad_norm=CLIP, poisson_sampling=False)
        trainer.plan_privacy(settings, steps=2)
    return trainer


def _average(trainer: SiteTrainer) -> dict[str, torch.Tensor]:
    """An 'average' that differs from the site's own encoder (another site's copy moved it)."""
    generator = torch.Generator().manual_seed(1)
    return {
        name: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for name, value in trainer.encoder_weights().items()
    }


def _step(trainer: SiteTrainer) -> list[torch.Tensor]:
    """One training step through a fixed returned gradient; the gradients applied, by parameter."""
    key = sorted(trainer.key_to_case)[0]
    plan = {"keys": [key], "origins": [[0, 2, 1]], "size": [32, 32, 32], "flips": [[False, False, False]]}
    features = trainer.forward(plan)
    generator = torch.Generator().manual_seed(3)
    trainer.backward({level: 1e-3 * torch.randn(t.shape, generator=generator) for level, t in features.items()})
    return [p.grad.detach().clone() for p in trainer.encoder.parameters()]


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp_sgd"])
def test_the_applied_gradient_gains_mu_times_the_distance_to_the_last_average(folder, private):
    plain, prox = _trainer(folder, private), _trainer(folder, private)
    average = _average(plain)
    plain.load_encoder_weights(average)
    prox.load_encoder_weights(average, fedprox_mu=MU)
    assert plain.fedprox_anchor is None and prox.fedprox_mu == MU
    # Right after the average the weights are the anchor: no pull, the same step.
    for a, b in zip(_step(plain), _step(prox)):
        assert torch.allclose(a, b, atol=1e-9)
    weights = {name: p.detach().clone() for name, p in prox.encoder.named_parameters()}
    applied = zip(prox.encoder.named_parameters(), _step(plain), _step(prox))
    gap = []
    for (name, _), without, with_prox in applied:
        expected = MU * (weights[name] - average[name])
        assert torch.allclose(with_prox - without, expected, rtol=1e-5, atol=1e-8), name
        gap.append(expected)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gap))
    # Far above C: with DP-SGD the proximal gradient was added after the clipping, not clipped with the case's.
    assert norm > 10 * CLIP


def test_no_pull_before_the_first_average_or_at_mu_zero(folder):
    trainer = _trainer(folder)
    assert trainer.proximal_gradients() == {}
    average = _average(trainer)
    trainer.load_encoder_weights(average, fedprox_mu=0.0)
    assert trainer.fedprox_anchor is None and trainer.proximal_gradients() == {}
    _step(trainer)
    assert trainer.proximal_gradients() == {}  # the weights moved, still nothing to add
    trainer.load_encoder_weights(average, fedprox_mu=MU)
    _step(trainer)
    assert trainer.proximal_gradients()
    trainer.load_encoder_weights(average)  # a later average without FedProx clears the anchor
    assert trainer.fedprox_anchor is None and trainer.proximal_gradients() == {}


@pytest.mark.parametrize("mu", [-0.1, math.nan, math.inf, True, "0.1"])
def test_a_malformed_mu_is_refused_naming_the_site(folder, mu):
    trainer = _trainer(folder)
    with pytest.raises(ValueError, match="site-3: fedprox_mu must be a finite number >= 0"):
        trainer.load_encoder_weights(trainer.encoder_weights(), fedprox_mu=mu)
    assert trainer.averages_loaded == 0


def test_a_resumed_site_pulls_towards_the_same_average(folder):
    trainer = _trainer(folder)
    trainer.load_encoder_weights(_average(trainer), fedprox_mu=MU)
    _step(trainer)
    resumed = _trainer(folder)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.fedprox_mu == MU
    expected, got = trainer.proximal_gradients().values(), resumed.proximal_gradients().values()
    assert len(expected) == len(got) > 0 and all(torch.equal(a, b) for a, b in zip(expected, got))


def test_the_executor_takes_mu_from_the_averages_meta(folder):
    executor = SplitSiteExecutor()
    executor.trainer = _trainer(folder)
    average = _average(executor.trainer)
    meta = {MetaKey.ITERATION: 4, MetaKey.FEDPROX_MU: MU}
    reply = executor._average(encoder_to_dxo(average, meta), "site-3", FLContext())
    assert from_shareable(reply).get_meta_prop(MetaKey.ITERATION) == 4
    assert executor.trainer.fedprox_mu == MU and executor.trainer.averages_loaded == 1
    anchor = executor.trainer.fedprox_anchor
    assert all(torch.equal(anchor[name], average[name]) for name in anchor)
    executor._average(encoder_to_dxo(average, {MetaKey.ITERATION: 8}), "site-3", FLContext())
    assert executor.trainer.fedprox_anchor is None  # an average without mu: FedProx off
