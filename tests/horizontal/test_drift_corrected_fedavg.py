"""horizontal.drift_corrected_fedavg: FLARE's FedAvg update, then DWCS on the global model the persistor saves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants

from splitunet.federated import DriftCorrection
from splitunet.horizontal.drift_corrected_fedavg import DriftCorrectedFedAvg, correct_params


def _workflow(drift_correction):
    workflow = DriftCorrectedFedAvg(num_rounds=3, drift_correction=drift_correction)
    workflow.fl_ctx = FLContext()
    workflow.event = lambda *args, **kwargs: None  # no engine here; the events themselves are FLARE's
    return workflow


def _params(rng):
    return {"conv.weight": rng.normal(size=(2, 3)).astype(np.float32), "count": np.array([3], dtype=np.int64)}


def _rounds(workflow, aggregates):
    model = FLModel(params_type=ParamsType.FULL, params=aggregates[0])
    out = []
    for round_index, params in enumerate(aggregates):
        workflow.current_round = round_index
        model = workflow.update_model(model, FLModel(params_type=ParamsType.FULL, params=params))
        out.append({name: np.array(value) for name, value in model.params.items()})
    return out


def test_every_round_after_the_first_is_pulled_towards_the_previous_global_model():
    rng = np.random.default_rng(0)
    aggregates = [_params(rng) for _ in range(3)]
    corrected = _rounds(_workflow({"alpha": 0.5, "learning_rate": 0.05}), aggregates)
    # The same correction computed independently on the same sequence of averages.
    reference = DriftCorrection(alpha=0.5, learning_rate=0.05)
    expected = [correct_params(reference, params, index) for index, params in enumerate(aggregates)]
    for got, want in zip(corrected, expected):
        np.testing.assert_allclose(got["conv.weight"], want["conv.weight"], rtol=1e-6)
        assert got["conv.weight"].dtype == np.float32 and got["count"].dtype == np.int64
    np.testing.assert_array_equal(corrected[0]["conv.weight"], aggregates[0]["conv.weight"])  # round 0: no reference
    for later in (1, 2):
        moved = np.abs(corrected[later]["conv.weight"] - aggregates[later]["conv.weight"])
        assert moved.max() > 1e-3  # the correction acts
        np.testing.assert_array_equal(corrected[later]["count"], aggregates[later]["count"])  # integers never change


def test_the_persistor_gets_the_corrected_model():
    rng = np.random.default_rng(1)
    workflow = _workflow({"alpha": 0.5, "learning_rate": 0.05})
    final = _rounds(workflow, [_params(rng) for _ in range(2)])[-1]
    saved = workflow.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
    np.testing.assert_array_equal(saved["weights"]["conv.weight"], final["conv.weight"])


def test_without_a_correction_it_is_flares_fedavg_update():
    rng = np.random.default_rng(2)
    aggregates = [_params(rng) for _ in range(2)]
    plain = _rounds(_workflow(None), aggregates)
    for got, want in zip(plain, aggregates):
        np.testing.assert_array_equal(got["conv.weight"], want["conv.weight"])


def test_a_bad_correction_is_refused_at_construction():
    with pytest.raises(ValueError, match="alpha"):
        DriftCorrectedFedAvg(num_rounds=1, drift_correction={"alpha": 2.0})
    assert torch.is_tensor(correct_params(DriftCorrection(), {"w": torch.ones(2)}, 0)["w"])
