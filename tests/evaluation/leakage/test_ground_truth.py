import pytest
import torch

from splitunet.data.party_data import ModalityFolder
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.attacks import build_encoder
from splitunet.evaluation.leakage import ACTIVATIONS, AuxiliaryImages, CapturedRun, GroundTruth
from splitunet.wire.protocol import MODALITIES


@pytest.fixture(scope="module")
def truth(workspace, secret):
    return GroundTruth(workspace / "data" / "parties", secret)


@pytest.fixture(scope="module")
def capture(workspace):
    return CapturedRun(workspace).capture(ACTIVATIONS, "site-1", 1)


def test_true_crops_are_the_ones_the_site_encoded(workspace, truth, capture):
    run = CapturedRun(workspace)
    crops = truth.image_crops("flair", capture.plan)
    assert crops.shape == (2, 1, 32, 32, 32)
    encoder = build_encoder(run.model.features, seed=run.model.seed + 1 + MODALITIES.index("flair"))
    with torch.no_grad():
        # Flips, origins and normalisation all have to match for the features to be reproduced exactly.
        assert torch.allclose(encoder(crops)[0], capture.observed[0], atol=1e-5)


def test_region_crops_are_binary_masks(truth, capture):
    wt = truth.region_crops(capture.plan, "WT")
    et = truth.region_crops(capture.plan, "ET")
    assert wt.shape == (2, 1, 32, 32, 32)
    assert set(torch.unique(wt).tolist()) <= {0.0, 1.0}
    assert torch.all(et <= wt)  # ET lies within the whole tumour


def test_a_wrong_secret_matches_no_case(workspace, capture):
    with pytest.raises(SplitUNetConfigError, match="match no case"):
        GroundTruth(workspace / "data" / "parties", "another secret").image_crops("flair", capture.plan)


def test_missing_data_folder(tmp_path, secret):
    with pytest.raises(SplitUNetConfigError, match="not found"):
        GroundTruth(tmp_path / "absent", secret)


def test_auxiliary_prior_and_random_crops(workspace, capture):
    aux = AuxiliaryImages(ModalityFolder(workspace / "data" / "parties" / "flair", "flair", party="attacker"))
    prior = aux.prior(capture.plan)
    assert prior.shape == (2, 1, 32, 32, 32) and torch.isfinite(prior).all()
    crops = aux.random_crops(5, [32, 32, 32], seed=1)
    assert crops.shape == (5, 1, 32, 32, 32)
    assert torch.equal(crops, aux.random_crops(5, [32, 32, 32], seed=1))
    assert not torch.equal(crops, aux.random_crops(5, [32, 32, 32], seed=2))
