"""horizontal.local_trainer with DP-SGD: a hospital fixes its budget before training, each round spends what the
projection says, the losses stay home, and no step goes beyond the budget."""

from __future__ import annotations

import numpy as np
import pytest

from splitunet.data.hospital_folder import HospitalFolder
from splitunet.dp import BudgetExhausted
from splitunet.errors import SplitUNetConfigError
from splitunet.horizontal import CaseCrops, FedAvgUNet, LocalSettings, LocalTrainer

FEATURES = (4, 8, 8, 16, 16, 4)
DP = {"noise_multiplier": 1.0, "max_grad_norm": 0.25}
STEPS = 3


def _settings(**changes) -> LocalSettings:
    values = {"features": FEATURES, "crop_size": (32, 32, 32), "num_val_cases": 1, "seed": 4, "dp": DP}
    return LocalSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def hospital(tiny_parties) -> HospitalFolder:
    return HospitalFolder(tiny_parties.parent / "msd", party="hospital-a")


@pytest.fixture(scope="module")
def private_round(hospital):
    trainer = LocalTrainer(hospital, _settings())
    with pytest.raises(SplitUNetConfigError, match="hospital-a: DP-SGD needs its budget planned"):
        trainer.train_round(None, 1)
    budget = trainer.plan_privacy(STEPS)
    start = {name: t.numpy().copy() for name, t in FedAvgUNet(FEATURES, seed=0).state_dict().items()}
    return trainer, budget, start, trainer.train_round(start, 2)


def test_a_private_round_trains_the_same_network_and_spends_the_projected_epsilon(private_round):
    trainer, budget, start, result = private_round
    assert budget.num_cases == len(trainer.train_cases) and budget.steps == STEPS
    assert result.weights.keys() == start.keys()  # the server's model component still fits
    assert any(not np.array_equal(result.weights[name], start[name]) for name in start)
    assert result.metrics["dp_epsilon"] == pytest.approx(budget.epsilon_at(budget.delta, steps=2), rel=1e-12)
    assert 0 < result.metrics["dp_epsilon"] < budget.epsilon and result.metrics["dp_delta"] == budget.delta
    assert trainer.epsilon() == result.metrics["dp_epsilon"]


def test_the_losses_stay_at_the_hospital(private_round):
    _, _, _, result = private_round
    assert "loss" in result.metrics
    assert result.shared_metrics() == {name: result.metrics[name] for name in ("iterations", "dp_epsilon", "dp_delta")}


def test_no_step_beyond_the_budget_and_no_second_budget(private_round):
    trainer, budget, _, _ = private_round
    with pytest.raises(BudgetExhausted, match="hospital-a: the round asks for 2 DP-SGD steps but 1 of the 3"):
        trainer.train_round(None, 2)
    with pytest.raises(SplitUNetConfigError, match="fixed for 3 steps; the job now asks for 30"):
        trainer.plan_privacy(30)
    assert trainer.plan_privacy(STEPS) is budget
    with pytest.raises(SplitUNetConfigError, match=r"FedProx \(mu 0.1\) cannot be combined with DP-SGD"):
        trainer.train_round(None, 1, mu=0.1)


def test_the_dataset_dp_sgd_samples_is_one_crop_per_training_case(private_round):
    trainer, _, _, _ = private_round
    crops = CaseCrops(trainer.data, trainer.train_cases, (32, 32, 32), seed=0)
    assert len(crops) == len(trainer.train_cases)
    image, regions = crops[0]
    assert tuple(image.shape) == (4, 32, 32, 32) and tuple(regions.shape) == (3, 32, 32, 32)
    assert set(np.unique(regions.numpy())) <= {0.0, 1.0}


def test_a_job_without_dp_has_no_budget(hospital):
    trainer = LocalTrainer(hospital, _settings(dp=None))
    with pytest.raises(SplitUNetConfigError, match="hospital-a: this job trains without DP-SGD"):
        trainer.plan_privacy(STEPS)
    assert trainer.epsilon() is None and trainer.dp_changes is None
