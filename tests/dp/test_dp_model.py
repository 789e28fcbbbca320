"""dp.dp_model: the U-Net Opacus trains computes what the U-Net does and keeps its state dict; in-place activations,
which break Opacus' hooks, are switched off; layers Opacus refuses are replaced and named."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from splitunet.dp import prepare_for_dp
from splitunet.horizontal import FedAvgUNet

FEATURES = (4, 8, 8, 16, 16, 4)


@pytest.fixture(scope="module")
def unet() -> FedAvgUNet:
    return FedAvgUNet(FEATURES, seed=1)


def test_the_dp_unet_is_the_same_function_with_the_same_weights(unet):
    original = copy.deepcopy(unet)
    prepared, changes = prepare_for_dp(unet)
    assert prepared is unet and changes.replaced == []
    assert prepared.state_dict().keys() == original.state_dict().keys()
    # Instance norm (affine, no running statistics) stays; only in-place flags changed.
    assert any(isinstance(module, nn.InstanceNorm3d) and module.affine for module in prepared.modules())
    assert changes.made_out_of_place and not any(getattr(m, "inplace", False) for m in prepared.modules())
    # The decoder's transposed convolutions have no Opacus grad sampler: torch.func computes theirs.
    assert changes.functorch and all(
        isinstance(prepared.get_submodule(name), nn.ConvTranspose3d) for name in changes.functorch
    )
    inputs = torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(prepared(inputs), original(inputs), rtol=0, atol=0)


def test_without_the_change_opacus_cannot_take_the_unet():
    raw = GradSampleModule(FedAvgUNet(FEATURES, seed=1))
    with pytest.raises(RuntimeError, match="modified inplace"):
        raw(torch.randn(1, 4, 32, 32, 32))


def test_a_layer_opacus_refuses_is_replaced_and_named():
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU(inplace=True))
    prepared, changes = prepare_for_dp(model)
    assert changes.replaced == ["1: BatchNorm3d -> GroupNorm"]
    assert isinstance(prepared[1], nn.GroupNorm) and changes.made_out_of_place == ["2"]
    assert "1 module(s) replaced (1: BatchNorm3d -> GroupNorm)" in changes.summary()
