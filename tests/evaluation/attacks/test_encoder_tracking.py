import pytest
from attack_setup import FEATURES

from splitunet.evaluation.attacks import (
    decoder_gradient_fn,
    encoder_distance,
    simulate_site_training,
    track_encoder,
)
from splitunet.evaluation.attacks.attack_measurements import threshold_regions

# 16x32x32 crops (the smallest whose x4 has more than one voxel, which instance norm needs in training) keep
# each of the 3 replayed iterations (two 20-step inversions) near a second on one thread.


@pytest.fixture(scope="module")
def site_run(aux_random_crops):
    crops = [aux_random_crops[i : i + 1, :, :16].clone() for i in range(3)]
    targets = [threshold_regions(c) for c in crops]
    return simulate_site_training(FEATURES, crops, decoder_gradient_fn(FEATURES, targets, seed=1), init_seed=0)


def test_simulation_applies_the_site_optimizer(site_run):
    assert len(site_run.observed) == len(site_run.gradients) == 3 and len(site_run.states) == 4
    assert sorted(site_run.observed[0]) == [0, 1, 2, 3, 4]
    # Adam's first step moves every weight with a gradient by about lr: the encoder really changed.
    assert encoder_distance(site_run.states[0], site_run.states[1]) > 0.1
    for before, after in zip(site_run.states, site_run.states[1:]):
        assert encoder_distance(before, after) > 0


def test_tracking_stays_closer_to_the_site_than_the_initial_weights(site_run, aux_random_crops):
    prior = aux_random_crops[:, :, :16].mean(0, keepdim=True)
    rows = track_encoder(
        FEATURES,
        site_run.states[0],
        site_run.observed,
        site_run.gradients,
        inversion={"iterations": 20},
        truth_states=site_run.states,
        truth_crops=site_run.crops,
        prior=prior,
        compare_untracked=False,  # the second inversion per iteration would double the cost
    )
    print(rows)
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    last = rows[-1]
    # Measured at iteration 3: weight distance 0.15 vs 4.3 (whole encoder: the deeper blocks replay on the
    # received features, so only conv_0 drifts), conv_0 0.15 vs 0.23, x0 feature error 0.18 vs 0.42.
    assert last["distance"] < 0.25 * last["distance_untracked"]
    assert last["distance_conv_0"] < 0.9 * last["distance_conv_0_untracked"]
    assert last["x0_error"] < 0.75 * last["x0_error_untracked"]
    assert last["ssim"] > last["ssim_prior"]
    assert rows[-1]["distance_untracked"] > rows[0]["distance_untracked"]


def test_replaying_the_exact_inputs_reproduces_the_site(site_run):
    # With the true crops instead of reconstructions the replay must land on the site's weights (up to float
    # rounding): checks that the replayed optimiser and the top-down gradient equal the site's step.
    from splitunet.evaluation.attacks import build_encoder, replay_step, site_optimizer

    tracked = build_encoder(FEATURES, site_run.states[0])
    optimizer = site_optimizer(tracked)
    for crops, received, sent in zip(site_run.crops, site_run.observed, site_run.gradients):
        replay_step(tracked, optimizer, crops, received, sent)
    assert encoder_distance(tracked.state_dict(), site_run.states[-1]) < 1e-3


def test_mismatched_sequences_are_refused(site_run):
    with pytest.raises(ValueError, match="same iterations"):
        track_encoder(FEATURES, site_run.states[0], site_run.observed, site_run.gradients[:1])
