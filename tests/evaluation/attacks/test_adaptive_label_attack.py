"""The adaptive label attack (smoothing from the trail's gradient noise, several thresholds, one chosen by the
attacker's rule) against the plain one (norm, Otsu), under strong gradient noise.

Set-up as in ``test_label_inference_adaptive.py`` (8 first-iteration crops seen by the FLAIR site), with noise
multiplier 2e-2 (noise std 9.7x the gradient's RMS at x0), read from the real filter's trail. Measured when
written, whole-tumour Dice: plain 0.087, adaptive with the attacker's rule 0.556 (smoothing sigma 1.50; Otsu marks
42 % of the crop there, so the rule falls back to the 0.95 quantile), best threshold (oracle, q0.98) 0.559.
"""

import numpy as np
import pytest
import torch
from attack_setup import CROP, SHAPE, crop_tensor, first_step_gradients
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext

from splitunet.evaluation.attacks import GradientLabelInference, adaptive_label_inference, defense_from_trail
from splitunet.evaluation.attacks.label_inference import LABEL_SMOOTHING_BASE, label_smoothing_sigma
from splitunet.evaluation.metrics import mask_dice
from splitunet.filters import ClippedGaussianNoise
from splitunet.wire.protocol import REGIONS, DataKind, MetaKey, level_key
from splitunet.wire.transport import dxo_to_features, features_to_dxo, register_tensor_support

CASES = ("BRATS_001", "BRATS_002", "BRATS_003", "BRATS_004")
WT = REGIONS.index("WT")


@pytest.fixture(scope="module")
def strong_noise(sites, labels):
    rng = np.random.default_rng(11)
    images, targets = [], []
    for case in CASES:
        regions, volumes = labels.read(case)[0], [site.read(case)[0] for site in sites]
        for _ in range(2):
            origin = [int(rng.integers(0, s - c + 1)) for s, c in zip(SHAPE, CROP)]
            images.append(torch.cat([crop_tensor(volume, origin) for volume in volumes], dim=1))
            targets.append(crop_tensor(regions, origin))
    targets = torch.cat(targets)
    clean = first_step_gradients(torch.cat(images), targets)[0]
    clip = {level_key(level): float(g.flatten(1).norm(dim=1).median()) for level, g in clean.items()}
    noise = ClippedGaussianNoise(clip_norm=clip, noise_multiplier=2e-2, seed=0)
    register_tensor_support()
    shareable = features_to_dxo(clean, DataKind.GRADIENTS, {"iteration": 1}).to_shareable()
    dxo = from_shareable(noise.process(shareable, FLContext()))
    noisy = dxo_to_features(dxo, DataKind.GRADIENTS)
    return clean, noisy, defense_from_trail(dxo.meta[MetaKey.FILTER_TRAIL]), targets[:, WT : WT + 1]


def test_adaptive_label_attack_survives_strong_gradient_noise(strong_noise):
    _, noisy, defense, truth = strong_noise
    plain, _ = GradientLabelInference().reconstruct(noisy, CROP)
    candidates, stats = adaptive_label_inference(noisy, CROP, noise_std=defense.noise(0)[1])
    dice = {name: float(mask_dice(mask, truth).mean()) for name, mask in candidates.items()}
    plain_dice = float(mask_dice(plain, truth).mean())
    print(f"plain {plain_dice:.3f}; adaptive {dice}; {stats}")
    assert stats["smoothing_sigma"] > 1.5 * LABEL_SMOOTHING_BASE  # the noise raised the smoothing
    assert {"otsu", "q0.9", "q0.95", "q0.98", "chosen"} <= set(candidates)
    assert dice["chosen"] > plain_dice + 0.25
    assert max(d for name, d in dice.items() if name != "chosen") >= dice["chosen"]


def test_smoothing_rule_without_noise(strong_noise):
    clean, *_ = strong_noise
    assert label_smoothing_sigma(clean[0]) == LABEL_SMOOTHING_BASE
    assert label_smoothing_sigma(clean[0], noise_std=1e-12) == pytest.approx(LABEL_SMOOTHING_BASE, rel=1e-3)
