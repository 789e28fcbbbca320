"""horizontal.local_trainer: a hospital's local round on its own cases, the weights it returns, FedProx's pull."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.sampling import extract_crop
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.federated.drift_correction import proximal_term
from splitunet.horizontal import FedAvgUNet, LocalSettings, LocalTrainer
from splitunet.networks import MonolithicSplitUNet
from splitunet.server.trainer import initial_decoder
from splitunet.site.trainer import initial_encoder
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES

FEATURES = (4, 8, 8, 16, 16, 4)
ITERATIONS = 4


def _settings(**changes) -> LocalSettings:
    values = {
        "features": FEATURES,
        "crop_size": (32, 32, 32),
        "batch_size": 2,
        "num_val_cases": 1,
        "learning_rate": 0.01,
        "sw_batch_size": 4,
        "seed": 4,
    }
    return LocalSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def hospital(tiny_parties) -> HospitalFolder:
    # The session's phantom in MSD layout (3 cases, 34x36x33), as one hospital holds it: every modality, labels.
    return HospitalFolder(tiny_parties.parent / "msd", party="hospital-a")


def _fixed_batch(hospital: HospitalFolder, cases) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    for case in cases:
        image, regions = hospital.read(case)
        images.append(extract_crop(image, (0, 2, 0), (32, 32, 32)))
        targets.append(extract_crop(regions, (0, 2, 0), (32, 32, 32)).astype(np.float32))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))


@torch.no_grad()
def _loss(trainer: LocalTrainer, batch) -> float:
    images, targets = batch
    return float(trainer.loss_fn(trainer.model(images), targets))


@pytest.fixture(scope="module")
def one_round(hospital):
    trainer = LocalTrainer(hospital, _settings())
    start = FedAvgUNet(FEATURES, seed=0)  # the global model: not the trainer's own initialisation
    start_weights = {name: tensor.numpy().copy() for name, tensor in start.state_dict().items()}
    batch = _fixed_batch(hospital, trainer.train_cases)
    trainer.load(start_weights)
    before = _loss(trainer, batch)
    result = trainer.train_round(start_weights, ITERATIONS)
    return trainer, start_weights, result, before, _loss(trainer, batch)


def test_a_local_round_changes_the_weights_and_lowers_the_loss(one_round):
    trainer, start, result, before, after = one_round
    assert any(not np.array_equal(result.weights[name], start[name]) for name in start)
    assert after < before
    assert result.metrics["iterations"] == ITERATIONS
    assert np.isfinite([result.metrics["loss"], result.metrics["first_loss"], result.metrics["last_loss"]]).all()


def test_the_returned_weights_fit_the_split_architecture(one_round):
    trainer, _, result, _, _ = one_round
    reference = MonolithicSplitUNet(len(MODALITIES), FEATURES, (0, 1, 2, 3), "concat", out_channels=3).state_dict()
    assert {name: tuple(w.shape) for name, w in result.weights.items()} == {
        name: tuple(t.shape) for name, t in reference.items()
    }
    assert all(isinstance(w, np.ndarray) and w.dtype == np.float32 for w in result.weights.values())
    # They are the trained model's weights: a fresh network given them predicts what the trainer's does.
    fresh = FedAvgUNet(FEATURES, seed=9)
    fresh.load_state_dict({name: torch.from_numpy(w) for name, w in result.weights.items()})
    images, _ = _fixed_batch(trainer.data, trainer.train_cases[:1])
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), trainer.model(images))


def test_the_round_counts_the_training_cases_for_weighting(one_round, hospital):
    trainer, _, result, _, _ = one_round
    assert result.num_cases == len(trainer.train_cases) == len(hospital.case_ids) - 1
    assert set(trainer.train_cases).isdisjoint(trainer.val_cases) and len(trainer.val_cases) == 1


def test_weights_of_another_architecture_are_refused_naming_the_hospital(one_round):
    trainer, start, _, _, _ = one_round
    wider = {name: w.numpy() for name, w in FedAvgUNet((8, 8, 8, 16, 16, 4)).state_dict().items()}
    with pytest.raises(SplitUNetConfigError, match="hospital-a: the global model does not fit.*other shape"):
        trainer.train_round(wider, 1)
    with pytest.raises(SplitUNetConfigError, match="missing"):
        trainer.load({name: w for name, w in start.items() if not name.startswith("decoder.")})


def test_validation_scores_each_region_on_the_held_out_case(one_round):
    trainer, _, result, _, _ = one_round
    dice = trainer.validate(result.weights)
    assert set(dice) == {"TC", "WT", "ET", "mean"}
    assert all(0.0 <= dice[region] <= 1.0 for region in ("TC", "WT", "ET"))
    assert dice["mean"] == pytest.approx(np.mean([dice["TC"], dice["WT"], dice["ET"]]))


def test_the_proximal_term_is_zero_at_mu_zero_and_at_the_global_weights(one_round):
    trainer, start, _, _, _ = one_round
    anchor = {name: torch.from_numpy(w) for name, w in start.items()}
    own = {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}
    with torch.no_grad():
        assert proximal_term(trainer.model, anchor, 0.0).item() == 0.0  # the trained weights differ from the anchor
        assert proximal_term(trainer.model, anchor, 1.0).item() > 0.0
        assert proximal_term(trainer.model, own, 5.0).item() == 0.0


def test_fedprox_keeps_the_local_model_closer_to_the_global_one(hospital):
    start = {name: t.numpy().copy() for name, t in FedAvgUNet(FEATURES, seed=0).state_dict().items()}

    def drift(mu: float) -> float:
        # Fresh trainers with one seed draw the same crops: only mu differs.
        result = LocalTrainer(hospital, _settings()).train_round(start, 2, mu=mu)
        return float(sum(np.sum((result.weights[name] - start[name]) ** 2) for name in start))

    plain, proximal = drift(0.0), drift(50.0)
    assert 0.0 < proximal < 0.5 * plain


@pytest.mark.parametrize("mu", [-0.1, float("nan"), True])
def test_a_bad_mu_is_refused_naming_the_hospital(one_round, mu):
    trainer, start, _, _, _ = one_round
    with pytest.raises(SplitUNetConfigError, match="hospital-a: FedProx mu"):
        trainer.train_round(start, 1, mu=mu)


def test_the_model_starts_from_the_split_jobs_initial_weights():
    config = SplitModelConfig(features=FEATURES, seed=3)
    split = MonolithicSplitUNet.from_parts(
        [initial_encoder(config, modality) for modality in MODALITIES], initial_decoder(config, len(MODALITIES))
    )
    state = FedAvgUNet(FEATURES, seed=3).state_dict()
    assert state.keys() == split.state_dict().keys()
    for name, tensor in split.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert not torch.equal(
        FedAvgUNet(FEATURES, seed=4).state_dict()["decoder.final_conv.weight"], state["decoder.final_conv.weight"]
    )


def test_a_hospital_needs_two_cases(hospital):
    alone = HospitalFolder(hospital.folder, party="hospital-a")
    alone.cases = dict(list(alone.cases.items())[:1])
    with pytest.raises(SplitUNetDataError, match="hospital-a.*need at least 2"):
        LocalTrainer(alone, _settings())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"crop_size": (16, 16, 16)}, "crop_size must be three ints >= 32"),
        ({"loss": "mse"}, "loss must be one of"),
        ({"num_val_cases": 0}, "num_val_cases must be an int >= 1"),
        ({"fusion": "max"}, "fusion must be"),
        ({"sw_overlap": 1.0}, "sw_overlap must be in"),
    ],
)
def test_malformed_settings_are_named(changes, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        _settings(**changes)
