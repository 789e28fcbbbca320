"""u_shape.networks: head, middle and tail composed are MONAI's BasicUNet, forward and autograd."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from splitunet.networks.layers import DEFAULT_ACT, DEFAULT_NORM
from splitunet.u_shape.networks import (
    PARTS,
    UShapeHead,
    UShapeMiddle,
    UShapeTail,
    seeded_part,
    split_basic_unet_state,
)

FEATURES = (2, 4, 4, 8, 8, 2)


def _parts_of(monolith: BasicUNet):
    parts = split_basic_unet_state(monolith.state_dict())
    head, middle, tail = UShapeHead(FEATURES), UShapeMiddle(FEATURES), UShapeTail(FEATURES)
    for module, part in zip((head, middle, tail), PARTS):
        module.load_state_dict(parts[part])  # strict: every name of the part, nothing else
    return head, middle, tail


def _u_shaped_step(head, middle, tail, image, target, loss_fn):
    """One step as the parties run it: only x0 goes to the middle and only u2 comes back; the tail's gradient of
    x0 (its skip) and the middle's are added at the hospital before the head's backward."""
    x0 = head(image)
    skip = x0.detach().requires_grad_(True)  # the hospital's own copy for the tail: its grad is the skip's share
    received_x0 = x0.detach().clone().requires_grad_(True)  # at the server
    u2 = middle(received_x0)
    received_u2 = u2.detach().clone().requires_grad_(True)  # back at the hospital
    logits = tail(received_u2, skip)
    loss = loss_fn(logits, target)
    loss.backward()
    u2.backward(received_u2.grad.clone())  # at the server: dL/du2 in, dL/dx0 out
    x0.backward(skip.grad + received_x0.grad)
    return logits.detach(), loss.detach()


@pytest.mark.parametrize("batch, shape", [(1, (32, 32, 32)), (1, (33, 35, 34))])
def test_three_parts_equal_basic_unet_forward_and_gradients(batch, shape):
    torch.manual_seed(0)
    monolith = BasicUNet(3, 4, 3, features=FEATURES, act=DEFAULT_ACT, norm=DEFAULT_NORM)
    head, middle, tail = _parts_of(monolith)
    image = torch.randn(batch, 4, *shape)
    target = (torch.rand(batch, 3, *shape) > 0.7).float()
    loss_fn = DiceCELoss(sigmoid=True)

    reference_logits = monolith(image)
    reference_loss = loss_fn(reference_logits, target)
    reference_loss.backward()
    logits, loss = _u_shaped_step(head, middle, tail, image, target, loss_fn)

    torch.testing.assert_close(logits, reference_logits.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-5, atol=1e-6)
    split = {name: p for module in (head, middle, tail) for name, p in module.named_parameters()}
    reference = dict(monolith.named_parameters())
    assert split.keys() == reference.keys()
    for name, parameter in reference.items():
        torch.testing.assert_close(split[name].grad, parameter.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_without_the_local_skip_gradient_the_head_gradient_is_wrong():
    """The comparison can fail: dropping the tail's share of dL/dx0 changes the head's gradient."""
    torch.manual_seed(1)
    monolith = BasicUNet(3, 4, 3, features=FEATURES, act=DEFAULT_ACT, norm=DEFAULT_NORM)
    head, middle, tail = _parts_of(monolith)
    image = torch.randn(1, 4, 32, 32, 32)
    target = (torch.rand(1, 3, 32, 32, 32) > 0.7).float()
    loss_fn = DiceCELoss(sigmoid=True)
    loss_fn(monolith(image), target).backward()
    x0 = head(image)
    received = x0.detach().requires_grad_(True)
    logits = tail(middle(received), x0.detach())  # the skip cut off from the head's graph
    loss_fn(logits, target).backward()
    x0.backward(received.grad)
    reference = monolith.conv_0.conv_0.conv.weight.grad
    assert not torch.allclose(head.conv_0.conv_0.conv.weight.grad, reference, rtol=1e-3, atol=1e-6)


def test_what_crosses_has_neither_the_image_nor_the_output_shape():
    head, middle, tail = (seeded_part(part, FEATURES, seed=5) for part in PARTS)
    image = torch.randn(2, 4, 32, 32, 32)
    x0 = head(image)
    u2 = middle(x0)
    assert tuple(x0.shape) == (2, FEATURES[0], 32, 32, 32)
    assert tuple(u2.shape) == (2, FEATURES[1], 16, 16, 16)
    assert tuple(tail(u2, x0).shape) == (2, 3, 32, 32, 32)


def test_seeded_parts_repeat_and_leave_torch_random_state_alone():
    state = torch.random.get_rng_state()
    first = seeded_part("head", FEATURES, seed=2**40 + 3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    again = seeded_part("head", FEATURES, seed=2**40 + 3).state_dict()
    other = seeded_part("head", FEATURES, seed=3).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["conv_0.conv_0.conv.weight"], other["conv_0.conv_0.conv.weight"])
    with pytest.raises(ValueError, match="part must be one of"):
        seeded_part("decoder", FEATURES, seed=0)


def test_a_state_entry_outside_the_three_parts_is_refused():
    with pytest.raises(ValueError, match="belongs to no part"):
        split_basic_unet_state({"encoder.weight": torch.zeros(1)})
