"""A finished run as ``splitunet demo --capture 1 2`` leaves it, made in-process for speed.

Phantom data split per party, a case-key secret, ``results.json`` pointing at a server run folder, and the
captures of site-1 (FLAIR): the activations of iteration 1 from the encoder the site seeds from the server's model
settings, and the gradients the server sent back with iteration 2, from a fresh decoder and the job's loss. That
is what the real first iteration does, without FLARE's start-up time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitunet.atomic_files import write_json_atomic
from splitunet.checkpoint import save_checkpoint
from splitunet.data.case_keys import case_key
from splitunet.data.partition import partition_msd
from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.data.phantom import generate_phantom
from splitunet.data.sampling import extract_crop
from splitunet.evaluation.attacks import build_encoder
from splitunet.networks import ServerDecoder
from splitunet.networks.losses import make_loss
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import LABELS_PARTY, MODALITIES, DataKind

SECRET = "leakage-test-secret"
SITES = {f"site-{i + 1}": modality for i, modality in enumerate(MODALITIES)}
FEATURES = (8, 16, 32, 64, 128, 8)
CASES = ("BRATS_001", "BRATS_002")
PLAN = {"origins": [[4, 4, 4], [6, 2, 5]], "size": [32, 32, 32], "flips": [[False, False, False], [True, False, True]]}


def _crops(folder_volumes, plan) -> torch.Tensor:
    crops = [extract_crop(v, o, plan["size"], f) for v, o, f in zip(folder_volumes, plan["origins"], plan["flips"])]
    return torch.from_numpy(np.stack(crops).astype(np.float32))


@pytest.fixture(scope="session")
def captured_workspace(tmp_path_factory):
    """``(workspace, model config)`` of a run with iteration-1 activation and iteration-2 gradient captures."""
    workspace = tmp_path_factory.mktemp("captured_run")
    data = workspace / "data"
    generate_phantom(data / "phantom_msd", 6, shape=(40, 40, 40), seed=5, progress=False)
    partition_msd(data / "phantom_msd", data / "parties", progress=False)
    (data / "case_key_secret.txt").write_text(SECRET)
    model = SplitModelConfig(features=FEATURES, seed=0)
    plan = {"keys": [case_key(case, SECRET) for case in CASES], **PLAN}

    labels = LabelFolder(data / "parties" / LABELS_PARTY, "msd", party="server")
    targets = _crops([labels.read(case)[0] for case in CASES], plan)
    leaves = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = ServerDecoder(len(SITES), FEATURES)
    for site, modality in SITES.items():
        folder = ModalityFolder(data / "parties" / modality, modality, party=site)
        images = _crops([folder.read(case)[0][None] for case in CASES], plan)
        encoder = build_encoder(FEATURES, seed=model.seed + 1 + MODALITIES.index(modality))
        with torch.no_grad():
            features = encoder(images)
        leaves.append({level: t.requires_grad_(True) for level, t in enumerate(features)})
    make_loss("dice_ce")(decoder(leaves), targets).backward()

    run_dir = workspace / "simulator" / "server" / "simulate_job"
    captures = run_dir / "captures"
    flair = {f"x{level}": t.detach() for level, t in leaves[0].items()}
    grads = {f"x{level}": t.grad for level, t in leaves[0].items()}
    common = {"site": "site-1", "filter_trail": [{"filter": "FeatureGuard", "party": "site-1", "call": 1}]}
    save_checkpoint(
        {"features": flair, "data_kind": DataKind.ACTIVATIONS, "iteration": 1, "plan": plan, **common},
        captures / DataKind.ACTIVATIONS / "site-1" / "iteration_000001.pt",
    )
    save_checkpoint(
        {"features": grads, "data_kind": DataKind.GRADIENTS, "iteration": 2, "plan": None, **common},
        captures / DataKind.GRADIENTS / "site-1" / "iteration_000002.pt",
    )
    write_json_atomic({"model": model.to_dict(), "sites": SITES, "status": "completed"}, run_dir / "results.json")
    write_json_atomic(
        {"job": "split_unet", "sites": SITES, "server_results": str(run_dir / "results.json")},
        workspace / "results.json",
    )
    return workspace, model


@pytest.fixture(scope="session")
def secret():
    return SECRET


@pytest.fixture(scope="session")
def workspace(captured_workspace):
    return captured_workspace[0]
