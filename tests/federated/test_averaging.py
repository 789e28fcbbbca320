"""averaging: FedAvg of state dicts, by hand and in float64; counters take the maximum; clear errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from splitunet.federated import weighted_average


def _state(value: float, batches: int) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.full((2, 3), value),
        "norm.running_mean": torch.tensor([value, -value], dtype=torch.float64),
        "norm.num_batches_tracked": torch.tensor(batches),
    }


def test_the_average_is_the_hand_computed_weighted_mean():
    states = [_state(1.0, 3), _state(2.0, 7), _state(4.0, 5)]
    merged = weighted_average(states, weights=[1, 1, 2])
    # (1 * 1 + 1 * 2 + 2 * 4) / (1 + 1 + 2) = 11 / 4, exact in binary.
    assert torch.equal(merged["conv.weight"], torch.full((2, 3), 2.75))
    assert torch.equal(merged["norm.running_mean"], torch.tensor([2.75, -2.75], dtype=torch.float64))
    assert merged["conv.weight"].dtype == torch.float32 and merged["norm.running_mean"].dtype == torch.float64
    assert list(merged) == list(states[0])


def test_random_states_match_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, 4, generator=generator)} for _ in range(3)]
    weights = [12, 5, 9]
    expected = sum(w * s["w"].double() for w, s in zip(weights, states)) / sum(weights)
    assert torch.allclose(weighted_average(states, weights)["w"].double(), expected, rtol=1e-6, atol=1e-7)
    # Scaling every weight by the same factor changes nothing.
    assert torch.equal(
        weighted_average(states, weights)["w"], weighted_average(states, [w * 0.25 for w in weights])["w"]
    )


def test_identical_states_come_back_bit_for_bit():
    # Weights 3/99, 5/99, ... are not exact in binary: float32 accumulation rounds, float64 accumulation does not.
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    weights = [3, 5, 11, 13, 17, 19, 31]
    assert torch.equal(weighted_average([{"x": x}] * len(weights), weights)["x"], x)
    in_float32 = torch.zeros_like(x)
    for weight in weights:
        in_float32.add_(x, alpha=weight / sum(weights))
    assert not torch.equal(in_float32, x)  # so the check above could fail for a float32 implementation


def test_integer_buffers_take_the_maximum_whatever_the_order():
    states = [_state(1.0, 3), _state(2.0, 7), _state(4.0, 5)]
    for order in itertools.permutations(range(3)):
        merged = weighted_average([states[i] for i in order], [1.0, 1.0, 1.0])
        assert merged["norm.num_batches_tracked"].item() == 7
        assert merged["norm.num_batches_tracked"].dtype == torch.int64


def test_a_state_with_weight_zero_contributes_nothing():
    merged = weighted_average([_state(1.0, 3), _state(100.0, 99)], [4, 0])
    assert torch.equal(merged["conv.weight"], torch.ones(2, 3))
    assert merged["norm.num_batches_tracked"].item() == 3


def test_the_result_owns_its_tensors_and_loads_into_a_module():
    module = nn.BatchNorm1d(3)
    state = module.state_dict()
    merged = weighted_average([state], [1])
    merged["weight"].add_(1.0)
    merged["num_batches_tracked"].add_(1)
    assert torch.equal(module.weight.detach(), torch.ones(3)) and module.num_batches_tracked.item() == 0
    module.load_state_dict(weighted_average([state, {k: v + 1 for k, v in state.items()}], [1, 3]))
    assert torch.allclose(module.weight.detach(), torch.full((3,), 1.75))


@pytest.mark.parametrize(
    ("states", "weights", "match"),
    [
        ([], [], "at least one"),
        ([_state(1.0, 1)], [1, 2], "2 weights for 1"),
        ([_state(1.0, 1), _state(2.0, 1)], [1, -1], "weight 1"),
        ([_state(1.0, 1), _state(2.0, 1)], [1, float("nan")], "weight 1"),
        ([_state(1.0, 1), _state(2.0, 1)], [0, 0], "positive sum"),
        ([_state(1.0, 1), {**_state(2.0, 1), "extra": torch.zeros(1)}], [1, 1], "extra \\['extra'\\]"),
        ([_state(1.0, 1), {"conv.weight": torch.zeros(2, 3)}], [1, 1], "missing"),
        ([_state(1.0, 1), {**_state(2.0, 1), "conv.weight": torch.zeros(3, 2)}], [1, 1], "shape"),
        ([_state(1.0, 1), {**_state(2.0, 1), "conv.weight": torch.zeros(2, 3).half()}], [1, 1], "dtype"),
    ],
)
def test_bad_input_is_refused_clearly(states, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average(states, weights)


def test_a_value_that_is_not_a_tensor_is_refused():
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        weighted_average([{"w": torch.zeros(1)}, {"w": [0.0]}], [1, 1])
