"""FLARE's FedAvg workflow with DWCS applied to every round's average (job ``fedavg_unet_dwcs``).

Everything but the model update is FLARE's :class:`~nvflare.app_common.workflows.fedavg.FedAvg`: client sampling,
the streaming weighted aggregation, FedProx metadata, the persistor. After each round's aggregate is merged into the
global model, :class:`~splitunet.federated.DriftCorrection` pulls the new global weights towards the previous
round's (formula and defaults in :mod:`splitunet.federated.drift_correction`), and the corrected model is what the
persistor saves and the next round sends. With ``drift_correction=None`` the workflow is FLARE's FedAvg exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.fedavg import FedAvg

from splitunet.federated.drift_correction import DriftCorrection

__all__ = ["DriftCorrectedFedAvg", "PART"]

# The one averaged part of the horizontal topology: the whole U-Net.
PART = "unet"


class DriftCorrectedFedAvg(FedAvg):
    """FedAvg whose global model is drift-corrected (DWCS) after every round's aggregation.

    Args:
        drift_correction: keyword arguments of :class:`~splitunet.federated.DriftCorrection` (``{}``: its defaults,
            ``mu = 1e-4``, ``alpha_max = 0.99``); ``None`` turns the correction off.
        *args, **kwargs: FLARE's :class:`~nvflare.app_common.workflows.fedavg.FedAvg` arguments.

    Raises:
        ValueError: a malformed ``drift_correction`` (from :class:`DriftCorrection`), at construction.
    """

    def __init__(self, *args, drift_correction: Mapping | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.correction = None if drift_correction is None else DriftCorrection(**dict(drift_correction))

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        """Merge the round's aggregate (FLARE's rule), then correct it before the persistor and next round see it."""
        self.event(AppEventType.BEFORE_SHAREABLE_TO_LEARNABLE)
        model = FLModelUtils.update_model(model, aggr_result)
        if self.correction is not None:
            model.params = correct_params(self.correction, model.params, int(self.current_round or 0))
        learnable = make_model_learnable(weights=model.params, meta_props=model.meta)
        self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, learnable, private=True, sticky=True)
        self.event(AppEventType.AFTER_SHAREABLE_TO_LEARNABLE)
        return model


def correct_params(correction: DriftCorrection, params: Mapping, round_index: int) -> dict:
    """DWCS on a FLARE params dict (NumPy arrays or tensors by name); returns the same kinds, dtypes and shapes."""
    state = {
        name: torch.as_tensor(np.asarray(value)) if not torch.is_tensor(value) else value
        for name, value in params.items()
    }
    corrected = correction.apply(state, round_index, part=PART)
    return {
        name: value
        if torch.is_tensor(params[name])
        else value.numpy().astype(np.asarray(params[name]).dtype, copy=False)
        for name, value in corrected.items()
    }
