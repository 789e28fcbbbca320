"""FLARE runs the server's task-data filters in each site's request thread at once: their state stays exact."""

from __future__ import annotations

import threading

import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext

from splitunet.filters import ChannelDropout, ClippedGaussianNoise, QuantizeFeatures
from splitunet.wire.protocol import DataKind, MetaKey
from splitunet.wire.transport import features_to_dxo, register_tensor_support

THREADS, CALLS_PER_THREAD = 8, 25


def _hammer(filter_):
    """Every thread filters its own DXOs through the same filter; returns each result's trail record."""
    register_tensor_support()
    features = {level: torch.randn(2, 4, *(8 // 2**level,) * 3) for level in range(4)}
    records, errors = [], []
    start = threading.Barrier(THREADS)

    def work():
        start.wait()
        try:
            for _ in range(CALLS_PER_THREAD):
                shareable = features_to_dxo(features, DataKind.GRADIENTS, {MetaKey.ITERATION: 1}).to_shareable()
                dxo = from_shareable(filter_.process(shareable, FLContext()))
                records.append(dxo.get_meta_prop(MetaKey.FILTER_TRAIL)[-1])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]
    assert not any(thread.is_alive() for thread in threads)
    return records


@pytest.mark.parametrize(
    "make_filter",
    [
        lambda: ClippedGaussianNoise(clip_norm=1.0, noise_multiplier=1.0, seed=0),
        lambda: ChannelDropout(rate=0.5, seed=0),
        lambda: QuantizeFeatures(precision="int8"),
    ],
    ids=["noise", "dropout", "quantize"],
)
def test_every_call_is_counted_once_with_its_own_number(make_filter):
    filter_ = make_filter()
    records = _hammer(filter_)
    total = THREADS * CALLS_PER_THREAD
    assert filter_.calls == total
    assert sorted(record["call"] for record in records) == list(range(1, total + 1))


def test_the_noise_filter_composes_epsilon_over_every_release_exactly_once():
    noise = ClippedGaussianNoise(clip_norm=1.0, noise_multiplier=1.0, seed=0)
    records = _hammer(noise)
    total = THREADS * CALLS_PER_THREAD
    assert sorted(record["releases"] for record in records) == list(range(1, total + 1))
    last = max(records, key=lambda record: record["releases"])
    assert last["epsilon_composed"] == pytest.approx(noise.epsilon(num_levels=4, releases=total))
