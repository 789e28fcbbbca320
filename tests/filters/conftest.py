"""Shared helpers of the filter tests: features shaped as the encoder makes them, and one filter pass."""

from __future__ import annotations

import pytest
import torch
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.fuel.utils import fobs

from splitunet.wire.protocol import DataKind
from splitunet.wire.transport import features_to_dxo, register_tensor_support


def _encoder_like_features(batch: int = 2, size: int = 32, channels=(8, 16, 32, 64, 128), seed: int = 0):
    """Level -> (B, C, D, H, W) tensors with the encoder's pyramid of sizes (odd sizes halve by floor)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        level: torch.randn(batch, c, *(size // 2**level,) * 3, generator=generator) for level, c in enumerate(channels)
    }


def _through_fobs(shareable: Shareable) -> Shareable:
    """Serialize and deserialize as FLARE does between parties."""
    register_tensor_support()
    return fobs.loads(fobs.dumps(shareable))


def _apply_filter(filter_, features, kind: str = DataKind.ACTIVATIONS, meta=None) -> tuple[Shareable, DXO]:
    """Run one filter on a feature DXO, then send the result through FOBS; returns (shareable, its DXO)."""
    register_tensor_support()
    shareable = features_to_dxo(features, kind, dict(meta or {"iteration": 1})).to_shareable()
    shareable = _through_fobs(filter_.process(shareable, FLContext()))
    try:
        dxo = from_shareable(shareable)
    except ValueError:
        dxo = None
    return shareable, dxo


@pytest.fixture
def make_features():
    """Factory of encoder-like features: ``make_features(batch=2, size=32, channels=..., seed=0)``."""
    return _encoder_like_features


@pytest.fixture
def features():
    return _encoder_like_features()


@pytest.fixture
def run_filter():
    """``run_filter(filter, features, kind=activations, meta=None) -> (shareable, dxo)`` after FOBS."""
    return _apply_filter


@pytest.fixture
def through_fobs():
    return _through_fobs
