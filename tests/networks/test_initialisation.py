"""initialisation: encoders drawn from every bit of a seed, with torch's default distribution."""

from __future__ import annotations

import math

import torch
from torch import nn

from splitunet.evaluation.attacks import build_encoder
from splitunet.networks import seeded_encoder
from splitunet.site.trainer import initial_encoder
from splitunet.wire.model_config import SplitModelConfig

FEATURES = (4, 8, 8, 16, 16)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_torch_alone_would_keep_32_bits_of_a_seed():
    # Why the module exists: these two seeds are different secrets but the same torch draws.
    torch.manual_seed(7)
    low = torch.rand(4)
    torch.manual_seed(7 + 2**40)
    assert torch.equal(low, torch.rand(4))


def test_every_bit_of_the_seed_selects_the_weights():
    seed = 2**62 + 12345
    assert _same(seeded_encoder(FEATURES, seed), seeded_encoder(FEATURES, seed))
    assert not _same(seeded_encoder(FEATURES, seed), seeded_encoder(FEATURES, seed - 2**40))
    assert not _same(seeded_encoder(FEATURES, 1), seeded_encoder(FEATURES, 2))


def test_the_draws_follow_torchs_default_bounds_and_leave_the_global_generator_alone():
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    encoder = seeded_encoder(FEATURES, 99)
    assert torch.equal(torch.rand(1), expected_next)
    for layer in encoder.modules():
        if isinstance(layer, nn.Conv3d):
            bound = 1 / math.sqrt(layer.weight[0].numel())
            assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
            # Uniform(-b, b) has standard deviation b / sqrt(3).
            assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.15 * bound
        elif isinstance(layer, nn.InstanceNorm3d) and layer.affine:
            assert torch.equal(layer.weight, torch.ones_like(layer.weight))


def test_a_known_seed_rebuilds_the_sites_initial_encoder():
    config = SplitModelConfig(features=FEATURES)
    private = 2**50 + 3
    assert _same(initial_encoder(config, "t2", private), build_encoder(FEATURES, seed=private))
    job_seed = config.seed + 1 + 3  # t2's offset of the job's seed
    assert _same(initial_encoder(config, "t2"), build_encoder(FEATURES, seed=job_seed))
