"""Initial weights drawn from every bit of a seed.

torch's CPU generator keeps only the low 32 bits of its seed (``torch.manual_seed(s)`` and
``torch.manual_seed(s + 2**32)`` draw the same numbers), so an encoder initialised with a site's private 63-bit
``encoder_seed`` through torch would hide its initial weights behind 32 bits: few enough to search. The encoders are
therefore initialised by :func:`seeded_encoder`, whose draws come from NumPy's PCG64 seeded through ``SeedSequence``,
which uses the whole integer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from splitunet.networks.site_encoder import SiteEncoder

__all__ = ["redraw_convolutions", "seeded_encoder"]


@torch.no_grad()
def redraw_convolutions(module: nn.Module, seed: int) -> nn.Module:
    """Draw every convolution's weight and bias again from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    That is torch's own default for convolutions (Kaiming-uniform with ``a = sqrt(5)``, and the same bound for the
    bias), so only the source of randomness changes. Normalisation layers keep their constant initial affine
    parameters.

    Args:
        module: the module whose convolutions are redrawn in place.
        seed: any non-negative int; all of its bits select the draws.

    Returns:
        ``module``.
    """
    rng = np.random.default_rng(int(seed))
    for layer in module.modules():
        if isinstance(layer, nn.modules.conv._ConvNd):
            bound = 1.0 / math.sqrt(layer.weight[0].numel())
            for parameter in (layer.weight, layer.bias):
                if parameter is not None:
                    draws = rng.uniform(-bound, bound, size=tuple(parameter.shape)).astype(np.float32)
                    parameter.copy_(torch.from_numpy(draws))
    return module


def seeded_encoder(features: Sequence[int], seed: int) -> SiteEncoder:
    """A 1-channel :class:`SiteEncoder` whose initial weights are a function of the whole ``seed``, built without
    touching torch's global random state.

    Args:
        features: BasicUNet feature sizes (5 or 6 ints).
        seed: a non-negative int (a site's private ``encoder_seed``, or the job's seed offset by modality).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) & 0xFFFFFFFF)  # any draw torch still makes (none in SiteEncoder today)
        encoder = SiteEncoder(in_channels=1, features=tuple(int(f) for f in features))
    return redraw_convolutions(encoder, seed)
