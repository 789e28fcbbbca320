"""``splitunet leakage-u-shape --quick``: the U-shape's server inverts x0 and reads labels from dL/du2.

One run of the command at tiny sizes (two hospitals of 40^3 phantoms, 32^3 crops, two iterations a round, so the
attacked iterations are the first, the first round's last and the second round's first), then checks on its report.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from splitunet.evaluation.leakage.u_shape_leakage import UShapeLeakageSettings, label_rows
from splitunet.evaluation.leakage.u_shape_view import Exchange, ServerView, check_server_view
from splitunet.tools.cli import main
from splitunet.wire.protocol import MODALITIES

SETTINGS = UShapeLeakageSettings.quick()
HOSPITALS = SETTINGS.names
ITERATIONS = [1, SETTINGS.iterations_per_round, SETTINGS.iterations_per_round + 1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("u_shape_leakage")
    assert main(["leakage-u-shape", "--out", str(out), "--quick"]) == 0
    assert (out / "report.md").read_text().startswith("# Leakage in the U-shape")
    return json.loads((out / "report.json").read_text())


def test_white_box_inversion_at_iteration_1_beats_the_prior_in_every_modality(report):
    first = [e for e in report["summary"]["inversion"] if e["iteration"] == 1 and e["attack"] == "white_box"]
    assert sorted(e["modality"] for e in first) == sorted(MODALITIES)
    for entry in first:
        assert entry["crops"] == len(HOSPITALS) * SETTINGS.batch_size
        assert entry["ssim_brain"]["mean"] - entry["ssim_prior_brain"] > 0.1, entry
        assert entry["ssim_reported_brain"] == entry["ssim_brain"]["mean"]
    assert sum(e["gain_brain"]["mean"] for e in first) / len(first) > 0.2


def test_every_attack_runs_where_its_threat_model_holds(report):
    attacks = {(e["iteration"], e["attack"]) for e in report["summary"]["inversion"]}
    first, last, second = ITERATIONS
    assert attacks == {
        (first, "white_box"),
        (last, "white_box_stale"),
        (last, "unsplit_from_average"),
        (last, "unsplit"),
        (second, "white_box"),
    }
    # The evaluator's replayed crops are those the heads encoded (checked where the server's head is exact).
    assert sorted(report["replay"]) == sorted(f"{h}@{i}" for h in HOSPITALS for i in (first, second))
    assert all(check["matches"] for check in report["replay"].values())


def test_label_inference_rows_for_every_hospital_with_dice_auc_and_baselines(report):
    rows = report["labels"]
    assert sorted({(row["hospital"], row["iteration"]) for row in rows}) == [
        (h, i) for h in HOSPITALS for i in ITERATIONS
    ]
    for row in rows:
        for key in ("dice", "dice_adaptive", "dice_random_mask"):
            assert 0.0 <= row[key] <= 1.0
        assert set(row["baselines"]) == {"tumour_frequency", "prediction", "reconstructed_flair"}
        for baseline in row["baselines"].values():
            assert 0.0 <= baseline["dice"] <= 1.0 and (math.isnan(baseline["auc"]) or 0.0 <= baseline["auc"] <= 1.0)
    pooled = {entry["iteration"]: entry for entry in report["summary"]["labels"]}
    assert set(pooled) == {*ITERATIONS, "all"}
    everything = pooled["all"]
    assert everything["crops"] == len(rows)
    # The gradient outlines the tumour far beyond a random mask of its size and beyond the tumour frequency map.
    assert everything["dice"]["mean"] > everything["dice_random_mask"] + 0.3
    assert everything["auc"]["mean"] > everything["baselines"]["tumour_frequency"]["auc"]
    assert isinstance(report["summary"]["labels_kept_from_server"], bool)
    assert report["summary"]["verdict_labels"].startswith(("No:", "Not shown:"))


def test_the_server_held_x0_u2_and_gradients_only(report):
    view = report["server_view"]
    half = [s // 2 for s in SETTINGS.crop_size]
    assert view["holds_labels"] is False
    assert view["tensors"] == {
        "x0": [SETTINGS.features[0], *SETTINGS.crop_size],
        "u2": [SETTINGS.features[1], *half],
        "du2": [SETTINGS.features[1], *half],
    }
    assert view["exchanges"] == len(HOSPITALS) * len(ITERATIONS)
    assert view["known_parts"] == [1, SETTINGS.iterations_per_round + 1]


def _view(du2: torch.Tensor) -> ServerView:
    config = SETTINGS.config()
    crop, half = tuple(config.crop_size), tuple(s // 2 for s in config.crop_size)
    exchange = Exchange(torch.zeros(1, config.features[0], *crop), torch.zeros(1, config.features[1], *half), du2, 0.5)
    return ServerView(config, 2, {"h": 1}, exchanges={"h": {1: exchange}})


def test_the_view_check_refuses_a_label_shaped_tensor():
    config = SETTINGS.config()
    half = tuple(s // 2 for s in config.crop_size)
    assert check_server_view(_view(torch.zeros(1, config.features[1], *half)))["holds_labels"] is False
    with pytest.raises(ValueError, match="h, iteration 1: the server holds du2"):
        check_server_view(_view(torch.zeros(1, 3, *config.crop_size)))


def test_the_label_attack_reads_the_gradient_alone():
    """Two different truths: the attack marks the same voxels (the truth only scores it)."""
    crop = (32, 32, 32)
    generator = torch.Generator().manual_seed(0)
    du2 = 0.01 * torch.randn(1, 8, 16, 16, 16, generator=generator)
    du2[..., 4:10, 4:10, 4:10] *= 20  # a strong-gradient blob where the tumour would be
    one, other = torch.zeros(1, 1, *crop), torch.zeros(1, 1, *crop)
    one[..., 8:20, 8:20, 8:20] = 1
    other[..., 20:30, 20:30, 20:30] = 1
    baseline = {"tumour_frequency": torch.full((1, 1, *crop), 0.1)}
    (first,), (second,) = label_rows(du2, crop, one, baseline), label_rows(du2, crop, other, baseline)
    assert first["fraction_marked"] == second["fraction_marked"] > 0
    assert first["dice_adaptive"] > 0.5 > second["dice_adaptive"]
