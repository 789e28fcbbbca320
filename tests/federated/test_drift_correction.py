"""drift_correction: DWCS acts on every averaged part, towards that part's previous round, with the documented
one-step closed form; alpha = 0 is FedAvg; FedProx's proximal term and its gradient."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from splitunet.federated import DriftCorrection, proximal_term

PARTS = {
    "head": lambda: nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)),
    "tail": lambda: nn.Sequential(nn.Conv3d(2, 3, 1), nn.InstanceNorm3d(3, affine=True)),
    "encoder/flair": lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)),
}


def _drift(state: dict, seed: int) -> dict:
    """The next round's averaged state: every floating tensor changes by 1e-7 .. 1e-2 per element, random sign,
    and a few elements stay as they were (as after averaging, where some parameters barely move)."""
    generator = torch.Generator().manual_seed(seed)
    moved = {}
    for key, value in state.items():
        if not value.is_floating_point():
            moved[key] = value + 1  # a counter: one more batch
            continue
        size = 10 ** (-7 + 5 * torch.rand(value.shape, generator=generator))
        sign = torch.where(torch.rand(value.shape, generator=generator) < 0.5, -1.0, 1.0)
        step = size * sign
        step.view(-1)[::4] = 0.0
        moved[key] = value + step
    return moved


@pytest.fixture
def rounds():
    """part -> averaged states of rounds 0, 1 and 2."""
    torch.manual_seed(0)
    result = {}
    for k, (part, build) in enumerate(PARTS.items()):
        state = {key: value.clone() for key, value in build().state_dict().items()}
        if "0.bias" in state:
            state["0.bias"] = torch.randn(state["0.bias"].shape)  # not the default init for any part
        first = _drift(state, seed=10 * k + 1)
        result[part] = [state, first, _drift(first, seed=10 * k + 2)]
    return result


def _closed_form(averaged, previous, alpha, learning_rate, tau):
    d = averaged.double() - previous.double()
    return previous.double() + d * (1 - alpha * learning_rate / (d.abs() + tau))


def test_round_zero_and_a_parts_first_round_return_the_averaged_state(rounds):
    correction = DriftCorrection()
    for part, states in rounds.items():
        out = correction.apply(states[0], 0, part=part)
        assert all(torch.equal(out[key], states[0][key]) for key in states[0])
    # A part first seen in a later round (say after a restart without its state) has nothing to compare with.
    late = correction.apply(rounds["head"][1], 5, part="late part")
    assert all(torch.equal(late[key], rounds["head"][1][key]) for key in late)


def test_every_averaged_part_moves_towards_its_own_previous_round(rounds):
    correction = DriftCorrection()
    for part, states in rounds.items():
        correction.apply(states[0], 0, part=part)
    for part, states in rounds.items():
        out = correction.apply(states[1], 1, part=part)
        previous, averaged = states[0], states[1]
        moved_tensors = 0
        for key, value in out.items():
            assert value.dtype == averaged[key].dtype and value.shape == averaged[key].shape
            if not value.is_floating_point():
                assert torch.equal(value, averaged[key])  # counters are never corrected
                continue
            changed = averaged[key] != previous[key]
            # Every element that changed since the previous round moves, and only those.
            assert (out[key] != averaged[key])[changed].all(), (part, key)
            assert torch.equal(out[key][~changed], averaged[key][~changed]), (part, key)
            # ... towards the previous round: the distance shrinks for every tensor.
            assert torch.dist(out[key], previous[key]) < torch.dist(averaged[key], previous[key]), (part, key)
            moved_tensors += 1
        assert moved_tensors >= 4, part  # weights, biases and running statistics of every part


def test_one_step_follows_the_closed_form_with_each_parts_own_reference(rounds):
    correction = DriftCorrection()
    tau = correction.adam_eps / correction.mu
    for round_index in range(3):
        for part, states in rounds.items():
            out = correction.apply(states[round_index], round_index, part=part)
            if round_index == 0:
                continue
            alpha = correction.alpha_at(round_index)
            for key, value in out.items():
                if value.is_floating_point():
                    expected = _closed_form(states[round_index][key], states[round_index - 1][key], alpha, tau, tau)
                    assert torch.allclose(value.double(), expected, rtol=1e-5, atol=1e-9), (part, key)


def test_mu_does_not_scale_the_step_adam_normalises_it():
    previous, averaged = {"w": torch.zeros(4)}, {"w": torch.tensor([1e-2, -3e-2, 5e-2, 1e-1])}
    results = []
    for mu in (1e-4, 1e-2, 1.0):
        correction = DriftCorrection(mu=mu, learning_rate=1e-3, alpha=1.0)
        correction.apply(previous, 0)
        results.append(correction.apply(averaged, 1)["w"])
        # Changes far above eps / mu all lose the same lr, whatever their size (sign descent).
        assert torch.allclose(averaged["w"].abs() - results[-1].abs(), torch.full((4,), 1e-3), rtol=2e-2)
    # A 10 000-fold mu changes the result by a hair, only through eps / mu.
    assert torch.allclose(results[0], results[2], rtol=0, atol=1e-5)


def test_the_default_rate_never_passes_the_previous_round_and_a_larger_one_does():
    previous = {"w": torch.zeros(2000)}
    generator = torch.Generator().manual_seed(3)
    d = 10 ** (-9 + 8 * torch.rand(2000, generator=generator)) * torch.sign(torch.randn(2000, generator=generator))
    for learning_rate, overshoots in ((None, False), (1e-2, True)):
        correction = DriftCorrection(alpha=1.0, learning_rate=learning_rate)  # alpha = 1: the strongest pull
        correction.apply(previous, 0)
        out = correction.apply({"w": d.clone()}, 1)["w"]
        passed = (torch.sign(out) == -torch.sign(d)) & (out != 0)
        assert passed.any() == overshoots
        if not overshoots:
            assert (out.abs() <= d.abs()).all()


def test_alpha_zero_is_exactly_fedavg(rounds):
    correction = DriftCorrection(alpha=0.0)
    for round_index in range(3):
        for part, states in rounds.items():
            out = correction.apply(states[round_index], round_index, part=part)
            assert all(torch.equal(out[key], states[round_index][key]) for key in out)


def test_the_alpha_schedule():
    correction = DriftCorrection()
    assert [correction.alpha_at(r) for r in (0, 1, 3, 99, 1000)] == [0.0, 0.5, 0.75, 0.99, 0.99]
    assert DriftCorrection(alpha_max=0.6).alpha_at(9) == 0.6
    assert [DriftCorrection(alpha=0.3).alpha_at(r) for r in (0, 1, 50)] == [0.0, 0.3, 0.3]


def test_a_retried_round_uses_the_same_reference_and_rounds_cannot_go_back(rounds):
    states = rounds["tail"]
    correction = DriftCorrection()
    correction.apply(states[0], 0, part="tail")
    first = correction.apply(states[1], 1, part="tail")
    again = correction.apply(states[1], 1, part="tail")
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], states[1][key]) for key in first)  # and it was a real correction
    with pytest.raises(ValueError, match="comes after round 1"):
        correction.apply(states[0], 0, part="tail")


def test_a_state_that_does_not_match_the_previous_round_is_refused_and_changes_nothing(rounds):
    states = rounds["head"]
    correction = DriftCorrection()
    correction.apply(states[0], 0, part="head")
    with pytest.raises(ValueError, match="missing"):
        correction.apply({key: value for key, value in states[1].items() if key != "0.weight"}, 1, part="head")
    wrong_shape = {**states[1], "0.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match="shape"):
        correction.apply(wrong_shape, 1, part="head")
    out = correction.apply(states[1], 1, part="head")
    expected = _closed_form(states[1]["0.weight"], states[0]["0.weight"], 0.5, 1e-4, 1e-4)
    assert torch.allclose(out["0.weight"].double(), expected, rtol=1e-5, atol=1e-9)


def test_a_restored_correction_continues_as_the_original(rounds, tmp_path):
    original = DriftCorrection()
    for round_index in range(2):
        for part, states in rounds.items():
            original.apply(states[round_index], round_index, part=part)
    torch.save(original.state_dict(), tmp_path / "dwcs.pt")
    restored = DriftCorrection()
    restored.load_state_dict(torch.load(tmp_path / "dwcs.pt"))
    assert restored.parts == list(PARTS)
    for part, states in rounds.items():
        a, b = original.apply(states[2], 2, part=part), restored.apply(states[2], 2, part=part)
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert any(not torch.equal(a[key], states[2][key]) for key in a)


def test_describe_is_json_and_names_the_settings():
    settings = json.loads(json.dumps(DriftCorrection(mu=1e-3, steps=2).describe()))
    assert settings["method"] == "DWCS" and settings["mu"] == 1e-3 and settings["steps"] == 2
    assert settings["learning_rate"] == pytest.approx(1e-5)  # eps / mu by default
    assert settings["alpha"] is None and settings["alpha_max"] == 0.99


@pytest.mark.parametrize(
    "kwargs", [{"mu": 0}, {"learning_rate": -1e-3}, {"steps": 0}, {"alpha": 1.5}, {"alpha_max": -0.1}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DriftCorrection(**kwargs)


# ------------------------------------------------------------------------------------------------------ FedProx


def _site_module() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.Conv3d(2, 1, 1))


def test_the_proximal_term_is_zero_at_the_global_state():
    module = _site_module()
    global_state = {key: value.clone() for key, value in module.state_dict().items()}
    term = proximal_term(module, global_state, mu=0.01)
    assert term.item() == 0.0 and term.requires_grad


def test_the_proximal_term_and_its_gradient():
    module = _site_module()
    global_state = {key: value.clone() for key, value in module.state_dict().items()}
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter))
    mu = 0.05
    term = proximal_term(module, global_state, mu)
    expected = sum(((p - global_state[n]) ** 2).sum() for n, p in module.named_parameters()) * mu / 2
    assert torch.allclose(term, expected)
    term.backward()
    for name, parameter in module.named_parameters():
        assert torch.allclose(parameter.grad, mu * (parameter.detach() - global_state[name])), name
    # The same from a mapping of parameters or from (name, parameter) pairs.
    assert torch.allclose(proximal_term(dict(module.named_parameters()), global_state, mu), expected)
    assert torch.allclose(proximal_term(module.named_parameters(), global_state, mu), expected)


def test_frozen_and_unshared_parameters_are_not_pulled():
    module = _site_module()
    global_state = {key: value.clone() for key, value in module.state_dict().items()}
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(1.0)
    module[0].weight.requires_grad_(False)  # frozen
    del global_state["2.weight"]  # not averaged: the site's own
    term = proximal_term(module, global_state, mu=2.0)
    pulled = [p for n, p in module.named_parameters() if n not in ("0.weight", "2.weight")]
    assert term.item() == pytest.approx(sum(p.numel() for p in pulled))  # (2 / 2) * sum of 1^2


def test_the_proximal_term_refuses_mismatched_names_and_shapes():
    module = _site_module()
    prefixed = {f"module.{key}": value for key, value in module.state_dict().items()}
    with pytest.raises(ValueError, match="no trainable parameter"):
        proximal_term(module, prefixed, mu=0.1)
    with pytest.raises(ValueError, match="shape"):
        proximal_term(module, {**module.state_dict(), "0.bias": torch.zeros(7)}, mu=0.1)
    with pytest.raises(ValueError, match="mu"):
        proximal_term(module, module.state_dict(), mu=-1.0)
