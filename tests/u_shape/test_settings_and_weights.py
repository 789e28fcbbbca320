"""u_shape settings and weights on the wire: malformed jobs fail before any hospital is contacted; head and tail
weights survive FLARE's serialization and nothing else passes for them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.fuel.utils import fobs

from splitunet.errors import SplitUNetConfigError
from splitunet.server.trainer import LOSSES
from splitunet.u_shape.config import LOSSES as U_SHAPE_LOSSES
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.networks import seeded_part
from splitunet.u_shape.settings import UShapeSettings
from splitunet.u_shape.weights_transport import dxo_to_parts, parts_to_dxo, weights_bytes
from splitunet.wire.transport import register_tensor_support


def test_the_settings_build_the_hospitals_config_and_refuse_what_cannot_run():
    settings = UShapeSettings(crop_size=[32, 40, 32], features=[2, 4, 4, 8, 8], drift_correction={"alpha": 0.5})
    assert settings.model == UShapeConfig.from_dict(settings.model.to_dict())
    assert settings.model.features == (2, 4, 4, 8, 8, 2) and settings.drift_correction == {"alpha": 0.5}
    assert U_SHAPE_LOSSES == LOSSES  # the split job's losses, by the same names
    for bad, message in [
        ({"crop_size": [16, 16, 16]}, "crop_size"),
        ({"on_site_failure": "continue"}, "on_site_failure"),
        ({"drift_correction": {"alpha": 2.0}}, "drift_correction: alpha"),
        ({"drift_correction": {"no_such": 1}}, "drift_correction"),
        ({"num_rounds": 0}, "num_rounds"),
        ({"loss": "mse"}, "loss"),
    ]:
        with pytest.raises(SplitUNetConfigError, match=message):
            UShapeSettings(**bad)
    with pytest.raises(SplitUNetConfigError, match="unknown U-shape settings"):
        UShapeConfig.from_dict({**settings.model.to_dict(), "skip_levels": [0]})


def test_head_and_tail_weights_cross_flare_serialization_unchanged():
    register_tensor_support()
    numpy_decomposers.register()  # FLARE's runtime registers them; a bare test process does not
    parts = {part: seeded_part(part, (2, 4, 4, 8, 8, 2), seed=1).state_dict() for part in ("head", "tail")}
    dxo = parts_to_dxo(parts, {"u_round": 1})
    assert dxo.data_kind == DataKind.WEIGHTS and all(isinstance(v, np.ndarray) for v in dxo.data.values())
    assert weights_bytes(dxo) == sum(t.numel() * t.element_size() for state in parts.values() for t in state.values())
    received = dxo_to_parts(from_shareable(fobs.loads(fobs.dumps(dxo.to_shareable()))), party="site-1")
    for part, state in parts.items():
        assert received[part].keys() == state.keys()
        assert all(torch.equal(received[part][name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize(
    "dxo, message",
    [
        (DXO(DataKind.WEIGHTS, {"middle.down_1.weight": np.zeros(2, np.float32)}), "names no part"),
        (DXO(DataKind.WEIGHTS, {"head.w": "text"}), "numeric array"),
        (DXO(DataKind.WEIGHTS, {"head.w": np.zeros(2, np.float32)}), r"no weights of \['tail'\]"),
        (DXO(DataKind.WEIGHT_DIFF, {"head.w": np.zeros(2, np.float32)}), "expected .*WEIGHTS"),
    ],
)
def test_anything_but_head_and_tail_weights_is_refused(dxo, message):
    with pytest.raises(ValueError, match=message):
        dxo_to_parts(dxo, party="site-1")
