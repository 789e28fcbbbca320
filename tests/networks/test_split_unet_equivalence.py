"""The equivalence contract: split training through serialized DXOs equals one monolithic autograd.

Each "site" encodes its channel, its features cross a real FLARE serialization (DXO -> Shareable -> FOBS bytes
and back), the "server" decodes and back-propagates to leaf tensors, and the gradients cross the same
serialization back to the sites. Outputs, loss and every parameter gradient must equal the monolith's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from monai.losses import DiceCELoss
from nvflare.apis.dxo import from_shareable
from nvflare.fuel.utils import fobs

from splitunet.networks import MonolithicSplitUNet
from splitunet.wire.protocol import DataKind
from splitunet.wire.transport import dxo_to_features, features_to_dxo, register_tensor_support

FEATURES = (4, 4, 8, 8, 16, 4)


def _over_the_wire(features, kind, party):
    """What the other side receives: the full FLARE serialization path, bytes included."""
    payload = fobs.dumps(features_to_dxo(features, kind, {"iteration": 1}).to_shareable())
    return dxo_to_features(from_shareable(fobs.loads(payload)), kind, party=party)


def _split_step(encoders, decoder, x, target, loss_fn):
    levels = decoder.required_levels
    site_outputs, received = [], []
    for channel, encoder in enumerate(encoders):
        features = encoder(x[:, channel : channel + 1])
        sent = {level: features[level] for level in levels}
        site_outputs.append(sent)
        received.append(_over_the_wire(sent, DataKind.ACTIVATIONS, f"site-{channel + 1}"))
    leaves = [{level: t.clone().requires_grad_(True) for level, t in f.items()} for f in received]
    logits = decoder(leaves, spatial_size=x.shape[2:])
    loss = loss_fn(logits, target)
    loss.backward()
    for sent, leaf_map in zip(site_outputs, leaves):
        grads = _over_the_wire({level: leaf.grad for level, leaf in leaf_map.items()}, DataKind.GRADIENTS, "server")
        torch.autograd.backward([sent[level] for level in sent], [grads[level] for level in sent])
    return logits.detach(), loss.detach()


@pytest.mark.parametrize("skip_levels", [(0, 1, 2, 3), (1, 2, 3)])
@pytest.mark.parametrize("shape", [(32, 32, 32), (33, 35, 34)])
def test_split_through_dxo_equals_monolithic_autograd(skip_levels, shape):
    register_tensor_support()
    torch.manual_seed(0)
    monolith = MonolithicSplitUNet(num_sites=4, features=FEATURES, skip_levels=skip_levels, fusion="concat").double()
    split_encoders = copy.deepcopy(monolith.encoders)
    split_decoder = copy.deepcopy(monolith.decoder)
    x = torch.randn(2, 4, *shape, dtype=torch.float64)
    target = (torch.rand(2, 3, *shape) > 0.7).double()
    loss_fn = DiceCELoss(sigmoid=True)

    reference_logits = monolith(x)
    reference_loss = loss_fn(reference_logits, target)
    reference_loss.backward()

    logits, loss = _split_step(split_encoders, split_decoder, x, target, loss_fn)

    torch.testing.assert_close(logits, reference_logits.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-10, atol=1e-10)
    split_params = dict(split_encoders.named_parameters(prefix="encoders"))
    split_params.update(split_decoder.named_parameters(prefix="decoder"))
    reference_params = dict(monolith.named_parameters())
    assert split_params.keys() == reference_params.keys()
    for name, parameter in reference_params.items():
        assert parameter.grad is not None and split_params[name].grad is not None, name
        torch.testing.assert_close(split_params[name].grad, parameter.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_equivalence_test_detects_a_wrong_gradient():
    """The comparison above can fail: a gradient scaled on the wire breaks it."""
    register_tensor_support()
    torch.manual_seed(1)
    monolith = MonolithicSplitUNet(num_sites=2, features=FEATURES).double()
    encoder = copy.deepcopy(monolith.encoders[0])
    x = torch.randn(1, 2, 32, 32, 32, dtype=torch.float64)
    monolith(x).sum().backward()
    features = encoder(x[:, :1])
    leaves = {level: features[level].detach().requires_grad_(True) for level in monolith.decoder.required_levels}
    other = {level: f.detach() for level, f in enumerate(monolith.encoders[1](x[:, 1:])) if level in leaves}
    monolith.decoder.zero_grad()
    monolith.decoder([leaves, other], spatial_size=x.shape[2:]).sum().backward()
    torch.autograd.backward([features[level] for level in leaves], [2 * leaves[level].grad for level in leaves])
    reference = dict(monolith.encoders[0].named_parameters())
    mismatched = [name for name, p in encoder.named_parameters() if not torch.allclose(p.grad, reference[name].grad)]
    assert mismatched
