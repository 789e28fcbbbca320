"""The segmentation loss every label holder uses."""

import pytest
import torch

from splitunet.networks.losses import LOSSES, make_loss


def test_unknown_loss_is_rejected_naming_the_choices():
    with pytest.raises(ValueError, match="dice_ce"):
        make_loss("l2")


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_scores_the_overlapping_regions_on_sigmoid_outputs(name):
    torch.manual_seed(0)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.7).float()
    right, wrong = (2 * target - 1) * 10, (1 - 2 * target) * 10  # logits: confident and right, confident and wrong
    loss = make_loss(name)
    assert loss(right, target).item() < 0.01
    assert loss(wrong, target).item() > 0.5
    # Regions overlap (TC inside WT): channels are independent sigmoids, not a softmax over them.
    both = torch.ones(1, 3, 4, 4, 4)
    assert loss(torch.full_like(both, 10.0), both).item() < 0.01


@pytest.mark.parametrize("name", LOSSES)
def test_background_voxels_get_a_gradient_of_their_own(name):
    # A crop with no tumour at all: every region should be pushed down everywhere, not left alone.
    logits = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    make_loss(name)(logits, torch.zeros(1, 3, 4, 4, 4)).backward()
    assert (logits.grad > 0).all()


def test_dice_ce_is_dice_plus_per_region_binary_cross_entropy():
    from monai.losses import DiceLoss

    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 6, 6, 6), (torch.rand(2, 3, 6, 6, 6) > 0.5).float()
    expected = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    expected = expected + torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), target)
    assert make_loss("dice_ce")(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_loss_refuses_targets_of_another_shape():
    with pytest.raises(ValueError, match="one channel per region"):
        make_loss("dice_ce")(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))
