import pytest
import torch

from splitunet.evaluation.attacks import EncoderPrefix, build_encoder


def test_prefix_gives_the_full_encoders_levels_and_runs_no_deeper_than_needed():
    encoder = build_encoder((4, 4, 8, 8, 8), seed=3)
    x = torch.randn(1, 1, 33, 34, 35, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = encoder(x)
        part = EncoderPrefix(encoder, [0, 2])(x)
    assert sorted(part) == [0, 2]
    for level, tensor in part.items():
        torch.testing.assert_close(tensor, full[level])
    assert len(EncoderPrefix(encoder, [1]).blocks) == 2


def test_build_encoder_is_seeded_loads_weights_and_leaves_global_random_state_alone():
    state = torch.random.get_rng_state()
    first, again, other = build_encoder((4, 4, 8, 8, 8), seed=1), build_encoder((4, 4, 8, 8, 8), seed=1), None
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
    other = build_encoder((4, 4, 8, 8, 8), seed=2)
    assert not torch.equal(other.conv_0.conv_0.conv.weight, first.conv_0.conv_0.conv.weight)
    copy = build_encoder((4, 4, 8, 8, 8), state_dict=other.state_dict(), seed=99)
    torch.testing.assert_close(copy.conv_0.conv_0.conv.weight, other.conv_0.conv_0.conv.weight)
    with pytest.raises(ValueError, match="does not fit"):
        build_encoder((8, 8, 8, 8, 8), state_dict=other.state_dict())


@pytest.mark.parametrize("levels", [[], [5], [-1]])
def test_prefix_levels_are_checked(levels):
    with pytest.raises(ValueError, match="levels"):
        EncoderPrefix(build_encoder((4, 4, 8, 8, 8)), levels)
