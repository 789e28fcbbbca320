"""Shared set-up of the attack tests: real phantom cases as a site and the server hold them, and one encoder.

Data: ``generate_phantom`` writes 6 cases of 48^3 (MSD layout), ``partition_msd`` splits them into party
folders, and each site's ``ModalityFolder`` / the server's ``LabelFolder`` read them exactly as in training
(site-side z-score normalisation, TC/WT/ET regions). Case BRATS_001 is the attacked crop's case; the others are
the attacker's auxiliary cases.

Encoder: a freshly initialised ``SiteEncoder`` with the demo's features (8, 16, 32, 64, 128). That is the encoder
whose features the server captures at iteration 1 (``CaptureFeatures``' default): the site's forward for t=1
precedes any update, so random init is no simplification for the first capture, and it keeps the tests free of a
training loop. Trained encoders are the subject of ``splitunet leakage`` on real captures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_setup import (
    CROP,
    ENCODER_SEED,
    FEATURES,
    NUM_CASES,
    SHAPE,
    TARGET_CASE,
    WHITE_BOX_X0,
    crop_tensor,
    one_thread,
)

from splitunet.data.partition import partition_msd
from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.data.phantom import generate_phantom
from splitunet.evaluation.attacks import WhiteBoxInversion
from splitunet.evaluation.metrics import mean_image_prior
from splitunet.networks import SiteEncoder
from splitunet.wire.protocol import MODALITIES


@pytest.fixture(autouse=True)
def one_torch_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def phantom_parties(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack_phantom")
    generate_phantom(root / "msd", NUM_CASES, shape=SHAPE, seed=3, progress=False)
    partition_msd(root / "msd", root / "parties", progress=False)
    return root / "parties"


@pytest.fixture(scope="session")
def sites(phantom_parties):
    """One ``ModalityFolder`` per modality, in ``protocol.MODALITIES`` order (FLAIR first: the attacked site)."""
    return [ModalityFolder(phantom_parties / m, m, party=f"site-{i + 1}") for i, m in enumerate(MODALITIES)]


@pytest.fixture(scope="session")
def flair(sites):
    return sites[0]


@pytest.fixture(scope="session")
def labels(phantom_parties):
    return LabelFolder(phantom_parties / "labels", "msd", party="server")


@pytest.fixture(scope="session")
def target_crop(flair):
    """The attacked FLAIR crop ``(1, 1, 32, 32, 32)`` in the site's normalisation."""
    return crop_tensor(flair.read(TARGET_CASE)[0])


@pytest.fixture(scope="session")
def aux_same_position(flair):
    """Auxiliary FLAIR crops at the attacked crop's origin ``(5, 1, 32, 32, 32)``: what the mean-image prior uses."""
    return torch.cat([crop_tensor(flair.read(case)[0]) for case in flair.case_ids if case != TARGET_CASE])


@pytest.fixture(scope="session")
def aux_random_crops(flair):
    """Auxiliary FLAIR crops at seeded random origins ``(20, 1, 32, 32, 32)``, for training a learned inverse."""
    rng = np.random.default_rng(7)
    crops = []
    for case in flair.case_ids:
        if case == TARGET_CASE:
            continue
        volume = flair.read(case)[0]
        for _ in range(4):
            origin = [int(rng.integers(0, s - c + 1)) for s, c in zip(volume.shape, CROP)]
            crops.append(crop_tensor(volume, origin))
    return torch.cat(crops)


@pytest.fixture(scope="session")
def prior(aux_same_position):
    """The uninformed prior: mean of the auxiliary crops at the attacked crop's origin ``(1, 1, 32, 32, 32)``."""
    return mean_image_prior(aux_same_position)


@pytest.fixture(scope="session")
def site_encoder():
    """The attacked site's encoder as ``SiteTrainer.build`` makes it: seeded, freshly initialised."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ENCODER_SEED)
        return SiteEncoder(1, FEATURES).eval()


@pytest.fixture(scope="session")
def clean_features(site_encoder, target_crop):
    """What the server receives without any defense: ``{level: (1, C, ...)}`` for x0..x4."""
    # One thread here too: results then do not depend on which test first asked for the fixture.
    with torch.no_grad(), one_thread():
        return dict(enumerate(site_encoder(target_crop)))


@pytest.fixture(scope="session")
def white_box_x0(site_encoder, clean_features):
    """No-defense white-box inversion of x0: ``(reconstruction, stats)``, computed once per session."""
    attack = WhiteBoxInversion(FEATURES, site_encoder.state_dict(), levels=[0], **WHITE_BOX_X0)
    # Session fixtures are set up before the per-test thread fixture, so they take their own.
    with one_thread():
        return attack.reconstruct({0: clean_features[0]})
