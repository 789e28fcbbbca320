"""The horizontal baseline's model: the split job's U-Net in one module, initialised as the split job initialises it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from splitunet.errors import SplitUNetConfigError
from splitunet.networks.initialisation import seeded_encoder
from splitunet.networks.server_decoder import ServerDecoder
from splitunet.networks.split_unet import MonolithicSplitUNet
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES, REGIONS

__all__ = ["FedAvgUNet", "state_to_numpy", "load_numpy_state"]


class FedAvgUNet(MonolithicSplitUNet):
    """:class:`~splitunet.networks.MonolithicSplitUNet` over the four modalities, with seeded initial weights.

    The architecture is the split job's: one encoder per modality (channel ``i`` is ``protocol.MODALITIES[i]``),
    the decoder fusing them level by level, three region logits. The initial weights are those the split job draws
    from the same ``seed`` when no site keeps a private ``encoder_seed``: encoder ``i`` from ``seed + 1 + i``
    (:func:`splitunet.site.trainer.initial_encoder`), the decoder from ``seed``
    (:func:`splitunet.server.trainer.initial_decoder`). So both settings start from one model, and the server's
    persistor, which builds this class from the job config, starts every run from the same weights.

    Args:
        features: BasicUNet feature sizes (5 or 6 ints).
        skip_levels: decoder skip levels among x0..x3.
        fusion: ``"concat"`` (the split job's) or ``"mean"``.
        seed: seed of the initial weights; torch's global random state is left as it was.

    Raises:
        SplitUNetConfigError: malformed model settings (the message names the setting).
    """

    def __init__(
        self,
        features: Sequence[int] = SplitModelConfig.features,
        skip_levels: Sequence[int] = SplitModelConfig.skip_levels,
        fusion: str = SplitModelConfig.fusion,
        seed: int = SplitModelConfig.seed,
    ):
        # The split job's own checks, so that a setting it refuses is refused here too.
        config = SplitModelConfig(features=tuple(features), skip_levels=tuple(skip_levels), fusion=fusion, seed=seed)
        encoders = [seeded_encoder(config.features, config.seed + 1 + index) for index in range(len(MODALITIES))]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            decoder = ServerDecoder(len(MODALITIES), config.features, config.skip_levels, config.fusion, len(REGIONS))
        # MonolithicSplitUNet.from_parts's way in: the parts are built above, not by the parent's constructor.
        nn.Module.__init__(self)
        self.encoders = nn.ModuleList(encoders)
        self.decoder = decoder
        self.config = config


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """A module's state as float32 NumPy arrays on the host: what FLARE's FedAvg and PT persistor exchange."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in module.state_dict().items()
    }


def load_numpy_state(module: nn.Module, weights: Mapping[str, np.ndarray | torch.Tensor], party: str) -> None:
    """Load weights received from the server into ``module``, refusing any other architecture.

    Raises:
        SplitUNetConfigError: missing or unexpected entries or another shape; the message names the party and
            the first entries that differ (a job whose model component and executor settings disagree).
    """
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = sorted(name for name in set(own) & set(weights) if tuple(np.shape(weights[name])) != tuple(own[name].shape))
    if missing or unexpected or wrong:
        details = [
            f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if names
        ]
        raise SplitUNetConfigError(
            f"{party}: the global model does not fit this hospital's network ({'; '.join(details)}); the server's "
            "model component and the hospitals' executor must have the same features, skip_levels and fusion"
        )
    state = {name: torch.as_tensor(np.asarray(weights[name])).to(own[name].dtype) for name in own}
    module.load_state_dict(state)
