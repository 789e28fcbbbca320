"""dp.private_split: DP-SGD through a returned gradient. A case weighs at most one clipped gradient in a step however
often the server puts it in the batch (the sensitivity C that Opacus' accountant assumes at sample rate 1), the
epsilon spent is Opacus' accountant on that Gaussian mechanism, and steps beyond the budget are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant

from splitunet.dp import (
    BudgetExhausted,
    DPSettings,
    PrivateSplitTraining,
    first_row_of_each_case,
    plan_budget,
    plan_split_budget,
    project_epsilon,
)
from splitunet.errors import SplitUNetConfigError

SIGMA, CLIP = 1.3, 0.5


def _part(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _private(steps: int = 3, noise_seed: int = 0, accountant: str = "rdp", **dp):
    part = _part()
    settings = DPSettings(
        **{"noise_multiplier": SIGMA, "max_grad_norm": CLIP, "poisson_sampling": False, "accountant": accountant, **dp}
    )
    budget = plan_split_budget(settings, num_cases=10, steps=steps)
    noise = torch.Generator().manual_seed(noise_seed)
    return part, PrivateSplitTraining([part], torch.optim.SGD(part.parameters(), lr=1.0), budget, noise)


def _step(part, private, inputs, returned, keys) -> list[torch.Tensor]:
    """The party's side: forward, back-propagate the returned gradient, one DP-SGD step; the applied gradient."""
    private.zero_grad()
    private.backward([part(inputs)], [returned])
    private.step(keys)
    return [p.grad.detach().clone() for p in part.parameters()]


def _norm(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def test_a_case_contributes_its_first_row_only():
    assert first_row_of_each_case(["a", "b", "a", "c", "b"]).tolist() == [True, True, False, True, False]
    assert first_row_of_each_case([]).tolist() == []


def test_one_cases_data_moves_a_step_by_at_most_c_and_its_second_row_not_at_all():
    """Neighbouring batches under the same noise: the sum changes by one clipped gradient (sensitivity C)."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(3, 6, generator=generator) * 10
    returned = torch.randn(3, 3, generator=generator) * 10  # far above C per row
    keys = ["a", "b", "a"]
    part, private = _private()
    applied = _step(part, private, inputs, returned, keys)
    denominator = 2  # distinct cases: the mean over them
    # Case b's data replaced (its returned gradient too): at most C apart in the sum, and certainly moved.
    other = inputs.clone()
    other[1] = torch.randn(6, generator=generator) * 10
    moved = returned.clone()
    moved[1] = -returned[1]
    part_b, private_b = _private()
    changed = _step(part_b, private_b, other, moved, keys)
    difference = _norm([x - y for x, y in zip(applied, changed)]) * denominator
    assert 0.1 * CLIP < difference <= 2 * CLIP * (1 + 1e-5)
    # Case b absent (its returned gradient zero, as if removed): exactly one clipped gradient of norm C apart.
    silent = returned.clone()
    silent[1] = 0
    part_c, private_c = _private()
    removed = _step(part_c, private_c, inputs, silent, keys)
    assert _norm([x - y for x, y in zip(applied, removed)]) * denominator == pytest.approx(CLIP, rel=1e-4)
    # Case a's second crop counts for nothing, whatever it holds.
    again = inputs.clone()
    again[2] = 0
    part_d, private_d = _private()
    same = _step(part_d, private_d, again, torch.cat([returned[:2], 5 * returned[2:]]), keys)
    for x, y in zip(applied, same):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_epsilon_spent_is_opacus_accountant_on_the_gaussian_mechanism(accountant):
    steps = 3
    part, private = _private(steps=steps, accountant=accountant)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        _step(part, private, torch.randn(2, 6, generator=generator), torch.randn(2, 3, generator=generator), "xy")
    delta = private.budget.delta
    # Opacus' own accountant, stepped by hand on the schedule: sigma, sample rate 1 (no subsampling), 3 steps.
    own = create_accountant(mechanism=accountant)
    for _ in range(steps):
        own.step(noise_multiplier=SIGMA, sample_rate=1.0)
    spent = private.epsilon()
    with np.errstate(divide="ignore"):  # the PRV accountant's log(1 - q) at q = 1
        assert spent == pytest.approx(own.get_epsilon(delta=delta), rel=1e-9)
    assert spent == pytest.approx(project_epsilon(SIGMA, 1.0, steps, delta, accountant), rel=1e-9)
    assert spent == pytest.approx(private.budget.epsilon, rel=1e-9)
    # Independently of Opacus: T Gaussian mechanisms of sensitivity C and noise sigma C compose to one of
    # mu = sqrt(T)/sigma (Dong et al.); its exact epsilon (Balle and Wang 2018) bounds both accountants from below,
    # and the PRV accountant is close to it.
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / SIGMA, delta)
    assert exact <= spent * (1 + 1e-6)
    if accountant == "prv":
        assert spent == pytest.approx(exact, abs=0.05)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_of(middle) > delta else (low, middle)
    return high


def test_steps_beyond_the_budget_are_refused_and_a_checkpoint_carries_the_spending():
    part, private = _private(steps=2)
    batch = (torch.randn(2, 6), torch.randn(2, 3))
    for _ in range(2):
        _step(part, private, *batch, ["a", "b"])
    with pytest.raises(BudgetExhausted, match=r"all 2 steps the epsilon of .* was projected for are taken"):
        private.require_step()
    with pytest.raises(BudgetExhausted):
        _step(part, private, *batch, ["a", "b"])
    _, resumed = _private(steps=2)
    resumed.load_state_dict(private.state_dict())
    assert resumed.steps_taken == 2 and resumed.epsilon() == pytest.approx(private.epsilon(), rel=1e-12)
    _, other = _private(steps=2, noise_multiplier=2.0)
    with pytest.raises(SplitUNetConfigError, match="is not of this job's schedule"):
        other.load_state_dict(private.state_dict())
    _, shorter = _private(steps=1)
    with pytest.raises(SplitUNetConfigError, match="more than the 1 this job's epsilon was projected for"):
        shorter.load_state_dict(private.state_dict())


def test_a_split_budget_has_no_subsampling_and_refuses_poisson_sampling():
    budget = plan_split_budget(DPSettings(target_epsilon=8.0, poisson_sampling=False), num_cases=30, steps=50)
    assert budget.sample_rate == 1.0 and budget.poisson_sampling is False
    assert 8.0 - 0.05 < budget.epsilon <= 8.0
    with pytest.raises(SplitUNetConfigError, match="set poisson_sampling false"):
        plan_split_budget(DPSettings(noise_multiplier=1.0), num_cases=30, steps=50)
    part = _part()
    subsampled = plan_budget(DPSettings(noise_multiplier=1.0), num_cases=30, batch_size=3, steps=5)
    with pytest.raises(SplitUNetConfigError, match="samples nothing"):
        PrivateSplitTraining([part], torch.optim.SGD(part.parameters(), lr=1.0), subsampled)
    with pytest.raises(SplitUNetConfigError, match="exactly the trained modules' parameters"):
        PrivateSplitTraining([part], torch.optim.SGD(_part().parameters(), lr=1.0), budget)


def test_a_data_independent_gradient_is_added_after_the_noise_unclipped_and_spends_nothing():
    """FedProx's proximal gradient at a SplitFed site: the applied gradient is the private one (the same noise) plus
    the extra gradient exactly, whatever its size, and the accountant records the same single step."""
    generator = torch.Generator().manual_seed(2)
    inputs, returned = torch.randn(2, 6, generator=generator), torch.randn(2, 3, generator=generator)
    part, private = _private()
    plain = _step(part, private, inputs, returned, ["a", "b"])
    part, with_extra = _private()
    extra = {p: torch.full_like(p, 100.0 * CLIP) for p in part.parameters()}  # far above C: clipping would show
    with_extra.zero_grad()
    with_extra.backward([part(inputs)], [returned])
    with_extra.step(["a", "b"], extra_gradients=extra)
    for p, without in zip(part.parameters(), plain):
        assert torch.allclose(p.grad, without + extra[p], atol=1e-6)
    assert with_extra.epsilon() == private.epsilon() and with_extra.steps_taken == 1
    foreign = torch.nn.Parameter(torch.zeros(5, 6))
    with pytest.raises(ValueError, match="not for a parameter of this DP-SGD training"):
        with_extra.step(["a"], extra_gradients={foreign: torch.zeros(5, 6)})
    assert with_extra.steps_taken == 1
