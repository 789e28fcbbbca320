"""run_malicious_server: FSHA without and with the site's GradientDetector, and its false alarms on honest runs."""

import math

import pytest
import torch

from splitunet.evaluation.malicious_server import random_crops, run_malicious_server, statistics_envelope
from splitunet.wire.protocol import MODALITIES

CROP = (32, 32, 32)


@pytest.fixture(scope="module")
def phantom(tiny_parties):
    from splitunet.data.party_data import LabelFolder, ModalityFolder

    folders = [ModalityFolder(tiny_parties / m, m, party=f"site-{i + 1}") for i, m in enumerate(MODALITIES)]
    labels = LabelFolder(tiny_parties / "labels", "msd", party="server")
    return folders, labels


def test_random_crops_cut_every_modality_and_the_labels_alike(phantom):
    folders, labels = phantom
    images, targets = random_crops(folders, folders[0].case_ids, 4, CROP, seed=3, labels=labels)
    assert images.shape == (4, len(MODALITIES), *CROP) and targets.shape == (4, 3, *CROP)
    assert set(targets.unique().tolist()) <= {0.0, 1.0}
    again, _ = random_crops(folders[:1], folders[0].case_ids, 4, CROP, seed=3)
    assert again[:, 0].equal(images[:, 0])  # same seed, same origins, whatever else is cut


def test_the_detector_stops_fsha_at_once_and_passes_honest_training(phantom):
    folders, labels = phantom
    cases = folders[0].case_ids
    honest_images, honest_targets = random_crops(folders, cases, 3, CROP, seed=0, labels=labels)
    private = honest_images[:, :1]
    auxiliary, _ = random_crops(folders[:1], cases, 3, CROP, seed=1)
    target = private[:1]
    prior = auxiliary.mean(0, keepdim=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two on the shared 2-core machine
    try:
        result = run_malicious_server(
            private, auxiliary, target, prior, honest_images, honest_targets,
            iterations=2, eval_every=1, honest_seeds=(0,), attack_options={"width": 8},
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    detection = result["detection"]
    assert (detection["tested"], detection["flagged"], detection["first_flag"]) == (2, 2, 1)
    assert "level_ratio x0" in detection["first_reason"]
    assert result["fsha_with_detector"]["refused_at"] == 1
    # Refused before the first update: the site's encoder never moves, and the run ends there, so the curve with
    # the detector stays at what the server decodes after that one (refused) iteration.
    assert result["fsha_with_detector"]["curve"][-1]["applied"] == 0
    refused = result["fsha_with_detector"]["curve"][-1]["ssim"]
    assert [row["ssim_with_detector"] for row in result["curve"]] == [result["curve"][0]["ssim_no_detector"]] + [
        refused
    ] * 2
    assert [row["iteration"] for row in result["curve"]] == [0, 1, 2]
    assert result["fsha"]["curve"][-1]["applied"] == 2  # without the detector every gradient was applied
    alarms = result["false_alarms"]
    assert (alarms["tested"], alarms["flagged"], alarms["rate"]) == (2, 0, 0.0)
    assert math.isfinite(alarms["runs"][0]["final_loss"])


def test_the_envelope_summarises_finite_statistics_and_counts_infinite_ratios():
    records = [
        {"statistics": {"level_ratio": {"x0": float(value), "x3": -math.inf}, "dc_fraction": {"x0": value / 100}}}
        for value in range(1, 102)
    ] + [{"statistics": None}]  # a malformed gradient set: its verdict says why, it has no statistics
    envelope = statistics_envelope(records)
    assert envelope["sets"] == 101 and envelope["infinite"] == {"x3": 101}
    assert envelope["level_ratio"]["x0"] == {"min": 1.0, "p01": 2.0, "median": 51.0, "max": 101.0}
    assert envelope["dc_fraction"]["x0"]["p99"] == pytest.approx(1.0) and envelope["dc_fraction"]["x0"]["max"] == 1.01
    assert envelope["dc_fraction"]["x0"]["min"] == 0.01  # an attack's closest approach to honest shares
