"""SiteTrainer with DP-SGD: the encoder's step through the gradient the server returned is the sum of each case's own
gradient clipped to C (a case repeated in the batch counts once), divided by the batch's cases, plus noise; the budget
bounds the steps, and a checkpoint carries what was spent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splitunet.data.party_data import ModalityFolder
from splitunet.data.sampling import extract_crop
from splitunet.dp import BudgetExhausted, DPSettings, prepare_for_dp
from splitunet.errors import SplitUNetConfigError
from splitunet.site.trainer import SiteTrainer, initial_encoder
from splitunet.wire.model_config import SplitModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(1, 2, 3), learning_rate=1e-2)
SEED = 5
CLIP = 0.01


@pytest.fixture
def folder(tiny_parties):
    return ModalityFolder(tiny_parties / "t1gd", "t1gd", party="site-3")


def _trainer(folder, steps: int = 2, **dp) -> SiteTrainer:
    trainer = SiteTrainer(folder, "test-secret")
    trainer.build(CONFIG, init_seed=SEED)
    # Noise far below the gradients, so that a step is the clipped mean alone.
    settings = {"noise_multiplier": 1e-9, "max_grad_norm": CLIP, "poisson_sampling": False, **dp}
    trainer.plan_privacy(DPSettings(**settings), steps)
    return trainer


def _plan(trainer, rows: int = 3) -> dict:
    keys = sorted(trainer.key_to_case)
    # Case 0 twice: a batch may repeat a case, which must still weigh one clipped gradient.
    chosen = [keys[0], keys[1], keys[0]][:rows]
    return {
        "keys": chosen,
        "origins": [[0, 2, 1], [1, 0, 0], [2, 4, 1]][:rows],
        "size": [32, 32, 32],
        "flips": [[False, True, False], [False, False, False], [True, False, False]][:rows],
    }


def _crop(trainer, plan, row) -> torch.Tensor:
    volume, _ = trainer.folder.read(trainer.key_to_case[plan["keys"][row]])
    crop = extract_crop(volume, plan["origins"][row], plan["size"], plan["flips"][row])
    return torch.from_numpy(np.ascontiguousarray(crop))[None, None]


def _norm(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def test_a_step_is_the_clipped_sum_of_each_cases_gradient_through_the_returned_gradient(folder):
    trainer = _trainer(folder)
    plan = _plan(trainer)
    features = trainer.forward(plan)
    rows = len(plan["keys"])
    # What a server with a mean loss over its batch returns: (1/B) times each case's own gradient.
    generator = torch.Generator().manual_seed(3)
    returned = {level: torch.randn(t.shape, generator=generator) / rows for level, t in features.items()}
    trainer.backward(returned)
    applied = [p.grad.detach().clone() for p in trainer.encoder.parameters()]

    # By hand: the same initial encoder, one case at a time, its loss's gradient B * returned[row].
    plain, _ = prepare_for_dp(initial_encoder(CONFIG, "t1gd", SEED))
    per_case = []
    for row in range(rows):
        plain.zero_grad(set_to_none=True)
        out = plain(_crop(trainer, plan, row))
        levels = sorted(returned)
        torch.autograd.backward(
            [out[level] for level in levels], [rows * returned[level][row : row + 1] for level in levels]
        )
        per_case.append([p.grad.detach().clone() for p in plain.parameters()])
    norms = [_norm(g) for g in per_case]
    assert min(norms) > 10 * CLIP  # clipping acts on every case: without it this test fails
    cases = 2  # rows 0 and 1; row 2 repeats case 0 and contributes nothing
    expected = [
        sum(per_case[row][k] * min(1.0, CLIP / (norms[row] + 1e-6)) for row in range(cases)) / cases
        for k in range(len(applied))
    ]
    for got, want in zip(applied, expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-8)
    assert _norm(applied) <= CLIP * (1 + 1e-4)
    unclipped = [sum(per_case[row][k] for row in range(cases)) / cases for k in range(len(applied))]
    assert _norm(unclipped) > 10 * _norm(applied)
    assert trainer.private.steps_taken == 1 and trainer.steps_applied == 1
    # The encoder keeps its names: its weights are averaged and checkpointed as without DP-SGD.
    assert list(trainer.encoder.state_dict()) == list(plain.state_dict())


def test_the_budget_bounds_the_steps_and_a_checkpoint_carries_the_spending(folder):
    trainer = _trainer(folder, steps=1)
    plan = _plan(trainer, rows=2)
    features = trainer.forward(plan)
    trainer.backward({level: torch.randn_like(t) for level, t in features.items()})
    assert trainer.epsilon() == pytest.approx(trainer.private.budget.epsilon, rel=1e-12)
    # The next step is refused before its crops are read.
    with pytest.raises(BudgetExhausted, match="all 1 steps"):
        trainer.forward(plan)
    state = trainer.state_dict()
    resumed = _trainer(folder, steps=3)
    resumed.load_state_dict(state)
    assert resumed.private.steps_taken == 1 and resumed.epsilon() > 0
    # A checkpoint of an encoder trained without DP-SGD is not resumed under DP-SGD.
    plain = SiteTrainer(folder, "test-secret")
    plain.build(CONFIG, init_seed=SEED)
    features = plain.forward(plan)
    plain.backward({level: torch.randn_like(t) for level, t in features.items()})
    with pytest.raises(SplitUNetConfigError, match="trained without DP-SGD"):
        _trainer(folder).load_state_dict(plain.state_dict())


def test_dp_is_refused_where_it_cannot_hold(folder):
    frozen = SiteTrainer(folder, "test-secret")
    frozen.build(SplitModelConfig(features=(4, 4, 8, 8, 16), train_encoders=False))
    settings = DPSettings(noise_multiplier=1.0, poisson_sampling=False)
    with pytest.raises(SplitUNetConfigError, match="freezes the encoders"):
        frozen.plan_privacy(settings, 5)
    trained = SiteTrainer(folder, "test-secret")
    trained.build(CONFIG)
    features = trained.forward(_plan(trained, rows=1))
    trained.backward({level: torch.randn_like(t) for level, t in features.items()})
    with pytest.raises(SplitUNetConfigError, match="before the encoder's first step"):
        trained.plan_privacy(settings, 5)
    with pytest.raises(SplitUNetConfigError, match="set poisson_sampling false"):
        _trainer(folder, poisson_sampling=True)
