"""Feature-space hijacking: the server's answers, the simulated site following them, and the attack's progress."""

import numpy as np
import pytest
import torch
from attack_setup import CROP, TARGET_CASE, crop_tensor

from splitunet.evaluation.attacks import FeatureSpaceHijacking, HijackCritic, run_fsha
from splitunet.evaluation.attacks.feature_space_hijacking import SimulatedSite
from splitunet.wire.model_config import SplitModelConfig

# A narrow encoder keeps the CI runs short; the hijack's mechanics do not depend on the width.
TINY = SplitModelConfig(features=(4, 8, 16, 32, 64))


@pytest.fixture(scope="module")
def private_crops(flair, target_crop):
    """The attacked site's training sequence: the measured crop and crops of the same case at random origins."""
    rng = np.random.default_rng(11)
    volume = flair.read(TARGET_CASE)[0]
    crops = [target_crop]
    for _ in range(3):
        crops.append(crop_tensor(volume, [int(rng.integers(0, s - c + 1)) for s, c in zip(volume.shape, CROP)]))
    return torch.cat(crops)


def test_the_server_answers_every_level_with_critic_gradients_on_the_hijacked_ones(private_crops, aux_random_crops):
    site = SimulatedSite(TINY)
    attack = FeatureSpaceHijacking(TINY.features, TINY.sent_levels, levels=[0, 4], width=8)
    sent = site.forward(private_crops[:1])
    # What the site should get: the gradient of the critic's mean score of its features (FSHA's f_loss).
    leaves = {level: sent[level].clone().requires_grad_(True) for level in (0, 4)}
    attack.critic(leaves).mean().backward()
    grads = attack.server_step(sent, aux_random_crops[:1])
    assert sorted(grads) == [0, 1, 2, 3, 4]
    assert all(grads[level].shape == sent[level].shape for level in grads)
    assert all(not grads[level].any() for level in (1, 2, 3))
    for level in (0, 4):
        assert grads[level].any()
        torch.testing.assert_close(grads[level], leaves[level].grad)
    before = [p.detach().clone() for p in site.encoder.conv_0.parameters()]
    site.backward(grads)
    assert site.steps_applied == 1
    assert any(not p.equal(q) for p, q in zip(site.encoder.conv_0.parameters(), before))


def test_the_pilot_autoencoder_learns_on_auxiliary_crops(aux_random_crops):
    attack = FeatureSpaceHijacking(TINY.features, levels=[0], width=8)
    generator = torch.Generator().manual_seed(0)
    draw = lambda: aux_random_crops[torch.randint(len(aux_random_crops), (2,), generator=generator)]  # noqa: E731
    fixed = aux_random_crops[:4]
    before = torch.nn.functional.mse_loss(attack.pilot_reconstruction(fixed), fixed)
    attack.pretrain(draw, 30)
    after = torch.nn.functional.mse_loss(attack.pilot_reconstruction(fixed), fixed)
    assert after < 0.8 * before  # measured 2.62 -> 1.72; an untrained pair stays at its start


def test_a_refusal_ends_the_run_before_the_refused_update(private_crops, aux_random_crops, target_crop, prior):
    seen = []

    def gate(iteration, grads):
        seen.append(sorted(grads))
        return "refused by the test" if iteration == 3 else None

    result = run_fsha(
        private_crops, aux_random_crops, target_crop, prior, iterations=6, eval_every=2, config=TINY,
        levels=[0], attack_options={"width": 8}, gate=gate,
    )  # fmt: skip
    assert result["refused_at"] == 3 and result["refusal"] == "refused by the test"
    assert seen == [[0, 1, 2, 3, 4]] * 3
    assert [(row["iteration"], row["applied"]) for row in result["curve"]] == [(0, 0), (2, 2), (3, 2)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"levels": [0, 3], "sent_levels": [0, 4]},
        {"levels": [7]},
        {"lr_pilot": 0},
        {"gradient_penalty": -1.0},
        {"critic_steps": 0},
        {"width": 0},
    ],
)
def test_bad_attack_settings_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        FeatureSpaceHijacking(TINY.features, **kwargs)


def test_bad_run_arguments_fail_before_training(private_crops, aux_random_crops, target_crop, prior):
    with pytest.raises(ValueError, match="private"):
        run_fsha(private_crops[:, 0], aux_random_crops, target_crop, prior, config=TINY)
    with pytest.raises(ValueError, match="pretrain_steps"):
        run_fsha(private_crops, aux_random_crops, target_crop, prior, config=TINY, pretrain_steps=-1)
    with pytest.raises(ValueError, match="iterations"):
        run_fsha(private_crops, aux_random_crops, target_crop, prior, config=TINY, iterations=0)


def test_reconstruct_follows_the_attack_contract(private_crops):
    attack = FeatureSpaceHijacking(TINY.features, levels=[0, 1], width=8)
    features = SimulatedSite(TINY).encode(private_crops[:2])
    reconstruction, stats = attack.reconstruct({f"x{level}": t for level, t in features.items()})
    assert reconstruction.shape == (2, 1, *CROP) and stats["levels"] == [0, 1]
    with pytest.raises(ValueError, match="missing"):
        attack.reconstruct({0: features[0]})
    critic = HijackCritic(TINY.features, [0, 1])
    assert critic({0: features[0], 1: features[1]}).shape == (2,)
