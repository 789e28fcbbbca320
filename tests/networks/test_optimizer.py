"""make_optimizer: decoupled weight decay, so that weights with small loss gradients keep their scale."""

from __future__ import annotations

import torch
from torch import nn

from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.evaluation.attacks.encoder_tracking import site_optimizer
from splitunet.evaluation.attacks.feature_space_hijacking import SimulatedSite
from splitunet.networks.optimizer import make_optimizer
from splitunet.server.trainer import ServerTrainer
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.model_config import SplitModelConfig

LEARNING_RATE, WEIGHT_DECAY = 2e-3, 1e-5  # the job's defaults


def _deep_block_norm_after(optimizer_factory, steps: int = 150) -> float:
    """Train a conv + instance-norm block (the U-Net's deepest blocks) whose loss gradient is far below the decay
    term, as measured for ``down_4`` at the job's initialisation; returns its weight norm relative to the start."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True))
    weight = block[0].weight
    start = float(weight.detach().norm())
    optimizer = optimizer_factory(block.parameters())
    data = torch.randn(2, 4, 6, 6, 6)
    target = torch.randn(2, 8, 6, 6, 6)
    for _ in range(steps):
        loss = 1e-9 * (block(data) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(weight.detach().norm()) / start


def test_a_deep_block_with_small_gradients_keeps_its_scale():
    kept = _deep_block_norm_after(lambda params: make_optimizer(params, LEARNING_RATE, WEIGHT_DECAY))
    assert 0.5 < kept < 2.0


def test_adam_with_coupled_decay_collapses_the_same_block():
    # Why the factory exists: the case the test above guards against, reproduced (the job's x3/x4 reached 1e-11).
    collapsed = _deep_block_norm_after(
        lambda params: torch.optim.Adam(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    )
    assert collapsed < 0.05


def test_decay_shrinks_each_weight_by_rate_times_decay_when_the_loss_ignores_it():
    weight = nn.Parameter(torch.full((3,), 0.5))
    optimizer = make_optimizer([weight], learning_rate=0.1, weight_decay=0.2)
    weight.grad = torch.zeros(3)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.5 * (1 - 0.1 * 0.2)))


def test_every_split_party_and_the_attackers_mirror_of_a_site_use_it(tiny_parties):
    config = SplitModelConfig(features=(4, 4, 8, 8, 16), learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    site = SiteTrainer(ModalityFolder(tiny_parties / "t1", "t1", party="site-2"), "secret")
    site.build(config)
    server = ServerTrainer(LabelFolder(tiny_parties / "labels", party="server"), "secret")
    server.build(config, num_sites=4)
    optimizers = [
        site.optimizer,
        server.optimizer,
        SimulatedSite(config, "t1").optimizer,
        site_optimizer(site.encoder, LEARNING_RATE, WEIGHT_DECAY),
    ]
    for optimizer in optimizers:
        assert isinstance(optimizer, torch.optim.AdamW)
        assert optimizer.param_groups[0]["weight_decay"] == WEIGHT_DECAY
