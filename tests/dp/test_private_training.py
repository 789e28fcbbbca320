"""dp.private_training: a DP-SGD step on a tiny 3D U-Net clips every case's gradient before averaging, spends what
the projection said, refuses steps beyond its budget, and draws noise no other party can replay."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from splitunet.dp import BudgetExhausted, DPSettings, PrivateTraining, plan_budget, prepare_for_dp
from splitunet.horizontal import FedAvgUNet
from splitunet.server.trainer import make_loss

FEATURES = (4, 8, 8, 16, 16, 4)
CROP = (32, 32, 32)


def _cases(count: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 4, *CROP, generator=generator)
    regions = (torch.rand(count, 3, *CROP, generator=generator) > 0.7).float()
    return TensorDataset(images, regions)


def _private(cases: TensorDataset, batch: int, steps: int, **dp) -> tuple[PrivateTraining, torch.nn.Module]:
    model, _ = prepare_for_dp(FedAvgUNet(FEATURES, seed=2))
    plain = copy.deepcopy(model)
    settings = DPSettings(**{"noise_multiplier": 1.0, "max_grad_norm": 1.0, **dp})
    budget = plan_budget(settings, len(cases), batch, steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = PrivateTraining(model, optimizer, DataLoader(cases, batch_size=batch), budget)
    return private, plain


def _gradient(model: torch.nn.Module, images, regions) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    make_loss("dice_ce")(model(images), regions).backward()
    return [parameter.grad.detach().clone() for parameter in model.parameters()]


def _norm(tensors) -> float:
    return float(torch.sqrt(sum((tensor.double() ** 2).sum() for tensor in tensors)))


def test_a_step_clips_each_cases_gradient_before_averaging():
    cases = _cases(2)
    clip = 0.01
    # Fixed batches of both cases and almost no noise, so the step's gradient is the clipped mean alone.
    private, plain = _private(
        cases, batch=2, steps=1, noise_multiplier=1e-6, max_grad_norm=clip, poisson_sampling=False
    )
    images, regions = cases.tensors
    per_case = [_gradient(plain, images[i : i + 1], regions[i : i + 1]) for i in range(2)]
    norms = [_norm(gradient) for gradient in per_case]
    # Every case's own gradient is far above C, and so is the plain mean gradient: without clipping this fails.
    assert min(norms) > 5 * clip
    assert _norm(_gradient(plain, images, regions)) > 2 * clip
    private.step(make_loss("dice_ce"))
    applied = [parameter.grad for parameter in private.optimizer.params]
    # Opacus' flat clipping: each case scaled to norm C over all parameters together, then the mean.
    expected = [
        sum(gradient[k] * min(1.0, clip / (norm + 1e-6)) for gradient, norm in zip(per_case, norms)) / 2
        for k in range(len(applied))
    ]
    for got, want in zip(applied, expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-7)
    assert _norm(applied) <= clip * (1 + 1e-4)


def test_epsilon_spent_is_the_projection_and_the_budget_ends_training():
    private, _ = _private(_cases(3), batch=2, steps=2)  # Poisson batches: q = 1/2
    assert private.epsilon() == 0.0
    private.step(make_loss("dice_ce"))
    assert private.epsilon() == pytest.approx(private.budget.epsilon_at(private.budget.delta, steps=1), rel=1e-12)
    private.step(make_loss("dice_ce"))
    assert private.epsilon() == pytest.approx(private.budget.epsilon, rel=1e-12)
    with pytest.raises(BudgetExhausted, match=r"all 2 steps the epsilon of .* \(delta 1e-05\) was projected for"):
        private.step(make_loss("dice_ce"))


def test_an_empty_poisson_batch_takes_a_noise_only_step():
    private, plain = _private(_cases(3), batch=2, steps=1)
    empty = (torch.zeros(0, 4, *CROP), torch.zeros(0, 3, *CROP))
    private._next_batch = lambda: empty  # Poisson sampling drew no case (probability 1/8 here)
    assert private.step(make_loss("dice_ce")) is None
    moved = [p.detach() - q.detach() for p, q in zip(private.optimizer.params, plain.parameters())]
    # SGD at rate 1 by the noise alone: std sigma * C / expected batch size (1 here) per coordinate.
    assert _norm(moved) > 0 and torch.cat([m.flatten() for m in moved]).std().item() == pytest.approx(1.0, rel=0.1)
    assert private.epsilon() == pytest.approx(private.budget.epsilon)


def test_the_noise_is_not_replayable_from_any_seed_the_job_knows():
    updates = []
    for _ in range(2):
        torch.manual_seed(0)  # whatever seed a job sets, the noise and the sampling draw from the OS
        model = torch.nn.Linear(3, 1)
        start = [parameter.detach().clone() for parameter in model.parameters()]
        cases = TensorDataset(torch.ones(4, 3), torch.ones(4, 1))
        budget = plan_budget(DPSettings(noise_multiplier=1.0), len(cases), 2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        private = PrivateTraining(model, optimizer, DataLoader(cases, batch_size=2), budget)
        private.step(torch.nn.functional.mse_loss)
        updates.append(torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), start)]))
    assert not torch.allclose(updates[0], updates[1])
