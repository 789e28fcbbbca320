"""SiteTrainer with two steps in flight (the server's ``pipeline_delay`` 1): kept crops, a recomputed forward pass."""

from __future__ import annotations

import pytest
import torch

from splitunet.data.party_data import ModalityFolder
from splitunet.data.sampling import window_plan
from splitunet.site.trainer import MAX_STEPS_IN_FLIGHT, SiteTrainer
from splitunet.wire.model_config import SplitModelConfig

CONFIG = SplitModelConfig(features=(4, 4, 8, 8, 16), skip_levels=(1, 2, 3), learning_rate=1e-2)


@pytest.fixture(autouse=True)
def one_thread():
    # As each FLARE party runs: on a busy machine, OpenMP threads waiting for a descheduled peer stretch tiny steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tiny_parties) -> SiteTrainer:
    site = SiteTrainer(ModalityFolder(tiny_parties / "t2", "t2", party="site-4"), "test-secret")
    site.build(CONFIG)
    return site


def _plans(site):
    keys = sorted(site.key_to_case)
    return [{**window_plan([key], [[1, 0, 2]], [32, 32, 32]), "flips": [[True, False, False]]} for key in keys[:2]]


def _gradients(features, seed):
    generator = torch.Generator().manual_seed(seed)
    return {level: torch.randn(t.shape, generator=generator) for level, t in features.items()}


def test_with_fixed_gradients_a_pipelined_site_ends_where_a_lock_step_site_does(tiny_parties):
    """A step's forward pass is recomputed with the weights it was first made with when no step came in between,
    and with the weights after the step before otherwise: exactly what a lock-step site's forward pass would see."""
    lock_step, pipelined = _trainer(tiny_parties), _trainer(tiny_parties)
    first, second = _plans(lock_step)
    grads = []
    for seed, plan in enumerate((first, second)):
        grads.append(_gradients(lock_step.forward(plan), seed))
        lock_step.backward(grads[-1])
    sent = [pipelined.forward(first), pipelined.forward(second)]
    assert pipelined.steps_in_flight == 2
    pipelined.backward(grads[0])
    pipelined.backward(grads[1])
    assert pipelined.steps_in_flight == 0 and pipelined.steps_applied == 2
    for name, value in lock_step.encoder.state_dict().items():
        torch.testing.assert_close(pipelined.encoder.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    # What the pipelined site sent for its second step was made before the first step's update: the stale features
    # the server's gradients are computed from.
    fresh = _trainer(tiny_parties)
    torch.testing.assert_close(sent[1][4], fresh.forward(second)[4], rtol=0, atol=1e-6)


def test_a_site_refuses_a_third_step_in_flight_and_sends_no_weights_mid_flight(tiny_parties):
    site = _trainer(tiny_parties)
    first, second = _plans(site)
    site.forward(first)
    site.forward(second)
    assert site.steps_in_flight == MAX_STEPS_IN_FLIGHT
    with pytest.raises(RuntimeError, match="at most 1 may be"):
        site.forward(first)
    with pytest.raises(RuntimeError, match="while a step's gradients are pending"):
        site.encoder_weights()
