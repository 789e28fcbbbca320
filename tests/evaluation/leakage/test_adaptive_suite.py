"""The leakage suite runs each attack plain and adapted to the capture's filter trail, side by side."""

import sys
from pathlib import Path

import pytest
import torch

from splitunet.data.party_data import ModalityFolder
from splitunet.evaluation.attacks import build_encoder, defense_from_trail
from splitunet.evaluation.leakage import (
    ACTIVATIONS,
    AttackBudget,
    AuxiliaryImages,
    CapturedRun,
    GroundTruth,
    best_inversion,
    invert_capture,
    leakage_markdown,
)
from splitunet.evaluation.leakage.report import auxiliary_phantom
from splitunet.filters import ChannelDropout
from splitunet.wire.protocol import MODALITIES

sys.path.insert(0, str(Path(__file__).parents[1] / "attacks"))
from attack_setup import run_filters  # noqa: E402


@pytest.fixture(scope="module")
def dropped(workspace, secret, tmp_path_factory):
    """Site-1's captured x0 through a real ChannelDropout 0.5, with everything invert_capture takes."""
    torch.set_num_threads(1)
    run = CapturedRun(workspace)
    capture = run.capture(ACTIVATIONS, "site-1", 1)
    observed, trail = run_filters([ChannelDropout(0.5, seed=0)], {0: capture.observed[0]})
    aux_parties = auxiliary_phantom(workspace / "data", tmp_path_factory.mktemp("auxiliary"))
    aux = AuxiliaryImages(ModalityFolder(aux_parties / "flair", "flair", party="attacker"))
    return {
        "observed": observed,
        "defense": defense_from_trail(capture.filter_trail + trail),
        "original": GroundTruth(workspace / "data" / "parties", secret).image_crops("flair", capture.plan),
        "prior": aux.prior(capture.plan),
        "aux_crops": aux.random_crops(2, capture.plan["size"]),
        "encoder": build_encoder(run.model.features, seed=run.model.seed + 1 + MODALITIES.index("flair")),
    }


def test_plain_and_adaptive_rows_side_by_side(dropped):
    args = [dropped[k] for k in ("encoder", "original", "prior", "aux_crops")]
    rows, images = invert_capture(
        dropped["observed"], [32] * 3, *args, AttackBudget.quick(), ["white_box", "learned_inverse"], dropped["defense"]
    )
    found = {(row["attack"], row["level"]): row for row in rows}
    assert set(found) == {
        ("white_box", "x0"),
        ("white_box_adaptive", "x0"),
        ("learned_inverse", "x0"),
        ("learned_inverse_adaptive", "x0"),
    }
    assert set(images) == set(found)
    assert found[("white_box_adaptive", "x0")]["init"] == "prior" and found[("white_box", "x0")]["init"] == "noise"
    assert best_inversion(rows) == max(rows, key=lambda row: row["ssim"])
    report = {
        "job": "split_unet_dropout",
        "iteration": 1,
        "sites": {
            "site-1": {
                "modality": "flair",
                "levels_received": ["x0"],
                "defenses_on_the_way": ["ChannelDropout"],
                "defense_model": dropped["defense"].describe(),
                "crops": 2,
                "inversion": rows,
                "label_inference": None,
                "figures": {},
                "notes": [],
            }
        },
    }
    text = leakage_markdown(report)
    assert "| SSIM plain | SSIM adaptive |" in text and "ChannelDropout {'rate': 0.5" in text
    plain, adaptive = found[("white_box", "x0")], found[("white_box_adaptive", "x0")]
    assert f"| white_box | x0 | {plain['ssim']:.3f} | {adaptive['ssim']:.3f} |" in text


def test_without_a_defense_the_learned_inverse_is_not_repeated(dropped):
    args = [dropped[k] for k in ("encoder", "original", "prior", "aux_crops")]
    budget = AttackBudget(learned_steps=2, learned_crops=2)
    rows, _ = invert_capture(dropped["observed"], [32] * 3, *args, budget, ["learned_inverse"], None)
    assert [row["attack"] for row in rows] == ["learned_inverse"]
    rows, _ = invert_capture(
        dropped["observed"], [32] * 3, *args, AttackBudget(white_box_iterations=2, adaptive=False), ["white_box"]
    )
    assert [row["attack"] for row in rows] == ["white_box"]
    with pytest.raises(ValueError, match="adaptive_init"):
        AttackBudget(adaptive_init="zeros")
