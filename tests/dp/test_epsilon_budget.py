"""dp.epsilon_budget: the projected epsilon grows with steps, falls with noise, and equals what Opacus' own privacy
engine reports after training the same schedule; a target epsilon is met."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from splitunet.dp import DPSettings, opacus_sample_rate, plan_budget, project_epsilon
from splitunet.errors import SplitUNetConfigError

DELTA = 1e-5


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_grows_with_steps_and_falls_with_noise(accountant):
    by_steps = [project_epsilon(1.0, 0.1, steps, DELTA, accountant) for steps in (10, 40, 160)]
    assert 0 < by_steps[0] < by_steps[1] < by_steps[2]
    by_noise = [project_epsilon(sigma, 0.1, 40, DELTA, accountant) for sigma in (0.7, 1.0, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2] > 0
    assert project_epsilon(1.0, 0.1, 0, DELTA, accountant) == 0.0


def _opacus_epsilon_after(steps: int, cases: int, batch: int, sigma: float, accountant: str) -> float:
    """Train a toy model with Opacus' PrivacyEngine and read its own accountant: no code of ours involved."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(cases, 3), torch.randn(cases, 1))
    model = torch.nn.Linear(3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus' note that secure_mode is off
        engine = PrivacyEngine(accountant=accountant)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=batch),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
        )
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    taken = 0
    while taken < steps:
        for inputs, targets in loader:
            if taken == steps:
                break
            optimizer.zero_grad()
            if len(inputs):
                torch.nn.functional.mse_loss(model(inputs), targets).backward()
            else:  # an empty Poisson batch: noise only
                for parameter in optimizer.params:
                    parameter.grad_sample = torch.zeros((0, *parameter.shape))
            optimizer.step()
            taken += 1
    return engine.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_projection_equals_opacus_own_accountant_on_the_same_schedule(accountant):
    cases, batch, sigma, steps = 10, 3, 0.9, 7
    # 10 cases in batches of 3 make 4 batches: Opacus' q is 1/4, not 3/10.
    assert opacus_sample_rate(cases, batch) == 0.25
    projected = project_epsilon(sigma, opacus_sample_rate(cases, batch), steps, DELTA, accountant)
    assert projected == pytest.approx(_opacus_epsilon_after(steps, cases, batch, sigma, accountant), rel=1e-9)


def test_a_target_epsilon_sets_the_noise_for_the_whole_job():
    budget = plan_budget(DPSettings(target_epsilon=4.0, max_grad_norm=0.5), num_cases=40, batch_size=4, steps=30)
    assert (budget.sample_rate, budget.steps, budget.max_grad_norm) == (0.1, 30, 0.5)
    assert budget.delta == pytest.approx(1e-5) and budget.num_cases == 40
    # Opacus' search stops within its tolerance below the target.
    assert 4.0 - 0.05 < budget.epsilon <= 4.0
    assert budget.epsilon == project_epsilon(budget.noise_multiplier, 0.1, 30, budget.delta)
    # Fewer steps on the same noise spend less; the budget's own projection says so.
    assert budget.epsilon_at(budget.delta, steps=10) < budget.epsilon


def test_a_given_noise_multiplier_is_kept_and_projected():
    budget = plan_budget(DPSettings(noise_multiplier=1.3, delta=1e-4), num_cases=20, batch_size=5, steps=12)
    assert (budget.noise_multiplier, budget.delta, budget.sample_rate) == (1.3, 1e-4, 0.25)
    assert budget.epsilon == project_epsilon(1.3, 0.25, 12, 1e-4)
    assert budget.as_dict()["epsilon"] == budget.epsilon


@pytest.mark.parametrize(
    "cases, batch, steps, message",
    [(0, 2, 10, "num_cases must be an int >= 1"), (10, 0, 10, "batch_size must be"), (10, 2, 0, "steps must be")],
)
def test_bad_sizes_are_named(cases, batch, steps, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        plan_budget(DPSettings(noise_multiplier=1.0), cases, batch, steps)
