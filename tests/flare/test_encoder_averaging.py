"""flare.encoder_averaging and flare.encoder_weights: the encoders of the sites sharing a modality are averaged by
their training cases through FLARE's aggregation, every R iterations, optionally corrected by DWCS, and resumed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable

from splitunet.federated.drift_correction import DriftCorrection
from splitunet.flare.encoder_averaging import EncoderAveraging, make_correction
from splitunet.flare.encoder_weights import dxo_to_encoder, encoder_to_dxo, weights_bytes
from splitunet.networks import seeded_encoder

GROUPS = {"flair": ["a-flair", "b-flair"], "t1": ["a-t1", "b-t1"], "t2": ["only-t2"]}
MODALITY_OF = {site: modality for modality, sites in GROUPS.items() for site in sites}
COUNTS = {"a-flair": 6, "b-flair": 2, "a-t1": 6, "b-t1": 2, "only-t2": 8}


def _encoder(seed: int) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in seeded_encoder((2, 2, 4, 4, 4), seed).state_dict().items()}


def _uploads() -> dict[str, dict[str, np.ndarray]]:
    return {site: _encoder(seed) for seed, site in enumerate(["a-flair", "b-flair", "a-t1", "b-t1"], start=1)}


def test_each_modality_is_averaged_by_training_cases_and_its_sites_get_the_same_average():
    averaging = EncoderAveraging(GROUPS, COUNTS, every=10)
    uploads = _uploads()
    averaged = averaging.average(uploads, MODALITY_OF, iteration=10)
    assert set(averaged) == {"flair", "t1"}  # a modality held by one site is never averaged
    for modality, (a, b) in (("flair", ("a-flair", "b-flair")), ("t1", ("a-t1", "b-t1"))):
        for name, value in averaged[modality].items():
            expected = (6 * uploads[a][name].astype(np.float64) + 2 * uploads[b][name]) / 8
            assert value.dtype == uploads[a][name].dtype
            np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
    # The copies differed, so each had drifted from the average; the one with fewer cases drifted further.
    distances = averaging.history[-1]["distance_to_average"]
    assert 0 < distances["a-flair"] < distances["b-flair"] and averaging.rounds == 1
    assert averaging.describe()["groups"] == {"flair": {"a-flair": 6, "b-flair": 2}, "t1": {"a-t1": 6, "b-t1": 2}}


def test_the_average_does_not_depend_on_the_order_the_replies_arrived_in():
    uploads = _uploads()
    forward = EncoderAveraging(GROUPS, COUNTS, every=10).average(uploads, MODALITY_OF, 10)
    backward = EncoderAveraging(GROUPS, COUNTS, every=10).average(dict(reversed(uploads.items())), MODALITY_OF, 10)
    for modality in forward:
        for name in forward[modality]:
            assert np.array_equal(forward[modality][name], backward[modality][name])


def test_averaging_is_due_every_r_iterations_among_modalities_with_two_active_sites():
    averaging = EncoderAveraging(GROUPS, COUNTS, every=4)
    assert [i for i in range(1, 13) if averaging.due(i)] == [4, 8, 12]
    active = ["a-flair", "b-flair", "a-t1", "only-t2"]  # b-t1 dropped out
    assert averaging.sites_to_average(active) == ["a-flair", "b-flair"]
    assert not EncoderAveraging(GROUPS, COUNTS, every=0).enabled
    assert not EncoderAveraging({"flair": ["site-1"], "t1": ["site-2"]}, {"site-1": 3, "site-2": 3}, 10).enabled
    with pytest.raises(ValueError, match="not averaged"):
        averaging.average({"only-t2": _encoder(1)}, MODALITY_OF, 4)
    with pytest.raises(ValueError, match=r"sites \['b-flair'\] have no training case"):
        EncoderAveraging(GROUPS, {**COUNTS, "b-flair": 0}, every=4)


def test_drift_correction_pulls_each_modalitys_average_towards_its_previous_one():
    uploads = _uploads()
    corrected = EncoderAveraging(GROUPS, COUNTS, every=1, correction=make_correction({}))
    plain = EncoderAveraging(GROUPS, COUNTS, every=1)
    reference = DriftCorrection()
    first = corrected.average(uploads, MODALITY_OF, 1)
    assert all(np.array_equal(first["flair"][n], v) for n, v in plain.average(uploads, MODALITY_OF, 1)["flair"].items())
    reference.apply({n: torch.from_numpy(v) for n, v in first["flair"].items()}, 0, part="encoder/flair")
    # The next round's copies moved; DWCS (round 1) takes the plain average part of the way back.
    moved = {site: {n: v + 0.01 * (i + 1) for n, v in state.items()} for i, (site, state) in enumerate(uploads.items())}
    average = plain.average(moved, MODALITY_OF, 2)["flair"]
    expected = reference.apply({n: torch.from_numpy(v) for n, v in average.items()}, 1, part="encoder/flair")
    second = corrected.average(moved, MODALITY_OF, 2)["flair"]
    for name, value in second.items():
        np.testing.assert_array_equal(value, expected[name].numpy())
    changed = [name for name in second if not np.array_equal(second[name], average[name])]
    assert changed
    assert corrected.describe()["drift_correction"]["method"] == "DWCS"


def test_a_resumed_averaging_continues_its_rounds_and_corrections():
    uploads = _uploads()
    moved = {site: {n: v * 1.1 for n, v in state.items()} for site, state in uploads.items()}
    uninterrupted = EncoderAveraging(GROUPS, COUNTS, every=5, correction=make_correction({}))
    uninterrupted.average(uploads, MODALITY_OF, 5)
    resumed = EncoderAveraging(GROUPS, COUNTS, every=5, correction=make_correction({}))
    resumed.load_state_dict(uninterrupted.state_dict())
    assert resumed.rounds == 1 and resumed.history == uninterrupted.history
    ours, theirs = uninterrupted.average(moved, MODALITY_OF, 10), resumed.average(moved, MODALITY_OF, 10)
    assert all(np.array_equal(ours["t1"][n], theirs["t1"][n]) for n in ours["t1"])
    with pytest.raises(ValueError, match="written with drift correction, this run has none"):
        EncoderAveraging(GROUPS, COUNTS, every=5).load_state_dict(uninterrupted.state_dict())


# --- the WEIGHTS DXO ---


def test_an_encoder_travels_as_flares_weights_dxo_and_is_checked_on_arrival():
    state = seeded_encoder((2, 2, 4, 4, 4), 3).state_dict()
    dxo = from_shareable(encoder_to_dxo(state, {"iteration": 10}).to_shareable())
    assert dxo.data_kind == DataKind.WEIGHTS and dxo.get_meta_prop("iteration") == 10
    expected = {name: tuple(value.shape) for name, value in state.items()}
    arrays = dxo_to_encoder(dxo, party="site-1", expected=expected)
    assert all(np.array_equal(arrays[name], value.numpy()) for name, value in state.items())
    assert weights_bytes(dxo) == sum(value.numel() * value.element_size() for value in state.values())
    with pytest.raises(ValueError, match="site-1 sent data kind 'splitunet_activations'"):
        dxo_to_encoder(DXO("splitunet_activations", {"x0": np.zeros(1)}), party="site-1")
    first = next(iter(expected))
    with pytest.raises(ValueError, match=r"site-1 sent other encoder weights: missing \[" + repr(first)):
        dxo_to_encoder(
            DXO(DataKind.WEIGHTS, {k: v for k, v in arrays.items() if k != first}), party="site-1", expected=expected
        )
    with pytest.raises(ValueError, match="expected a numeric array"):
        dxo_to_encoder(DXO(DataKind.WEIGHTS, {first: "weights"}), party="site-1")


@pytest.mark.parametrize("mu", [-1e-3, float("nan"), True])
def test_fedprox_mu_is_recorded_and_a_malformed_one_refused(mu):
    assert EncoderAveraging(GROUPS, COUNTS, every=10).describe()["fedprox_mu"] == 0.0
    assert EncoderAveraging(GROUPS, COUNTS, every=10, fedprox_mu=0.1).describe()["fedprox_mu"] == 0.1
    with pytest.raises(ValueError, match="fedprox_mu must be a finite number >= 0"):
        EncoderAveraging(GROUPS, COUNTS, every=10, fedprox_mu=mu)
