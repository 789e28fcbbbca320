import pytest
import torch

from splitunet.evaluation.metrics import expected_random_dice, mask_dice, random_mask_like


def _ball(size: int = 20, radius: float = 5.0, centre=(10, 10, 10)) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    distance = (grid - torch.tensor(centre, dtype=torch.float32).reshape(3, 1, 1, 1)).norm(dim=0)
    return (distance <= radius).float()[None, None]


def test_dice_of_identical_disjoint_and_empty_masks():
    ball = _ball()
    assert mask_dice(ball, ball).item() == pytest.approx(1.0)
    assert mask_dice(ball, _ball(centre=(3, 3, 3), radius=2)).item() == 0.0
    empty = torch.zeros_like(ball)
    assert mask_dice(empty, empty).item() == 1.0  # nothing to find, nothing claimed
    assert mask_dice(empty, ball).item() == 0.0


def test_half_overlap_gives_the_textbook_value():
    truth = torch.zeros(1, 1, 12, 12, 12)
    truth[..., :6] = 1
    mask = torch.zeros_like(truth)
    mask[..., 3:9] = 1
    assert mask_dice(mask, truth).item() == pytest.approx(0.5)


def test_random_masks_reach_the_expected_chance_level():
    truth = _ball(radius=6).expand(2, 1, 20, 20, 20).clone()
    claimed = _ball(radius=4).expand(2, 1, 20, 20, 20).clone()
    generator = torch.Generator().manual_seed(0)
    measured = torch.stack([mask_dice(random_mask_like(claimed, generator), truth) for _ in range(20)]).mean(0)
    expected = expected_random_dice(truth, claimed.flatten(1).sum(1))
    torch.testing.assert_close(measured, expected, rtol=0.15, atol=0.0)
    assert torch.all(random_mask_like(claimed, generator).flatten(1).sum(1) == claimed.flatten(1).sum(1))
    assert expected_random_dice(torch.zeros(1, 1, 4, 4, 4), 0).item() == 1.0


@pytest.mark.parametrize(
    "mask, truth, message",
    [
        (torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5), "differ in shape"),
        (torch.full((1, 1, 4, 4, 4), 0.5), torch.zeros(1, 1, 4, 4, 4), "binary"),
        (torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), r"\(B, 1, D, H, W\)"),
    ],
)
def test_bad_masks_are_refused(mask, truth, message):
    with pytest.raises(ValueError, match=message):
        mask_dice(mask, truth)
