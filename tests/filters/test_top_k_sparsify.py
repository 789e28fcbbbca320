import math

import pytest
import torch

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import TopKSparsify
from splitunet.wire.protocol import DataKind
from splitunet.wire.transport import dxo_to_features, payload_bytes


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_keeps_exactly_the_largest_fraction_per_sample(run_filter, features, fraction):
    _, dxo = run_filter(TopKSparsify(fraction), features)
    out = dxo_to_features(dxo, DataKind.ACTIVATIONS)
    for level, tensor in features.items():
        flat_in = tensor.reshape(tensor.shape[0], -1)
        flat_out = out[level].reshape(flat_in.shape)
        k = math.ceil(fraction * flat_in.shape[1])
        for sample in range(flat_in.shape[0]):
            kept = flat_out[sample] != 0
            assert int(kept.sum()) == k
            torch.testing.assert_close(flat_out[sample][kept], flat_in[sample][kept])
            # Every dropped value is no larger than the smallest kept one.
            assert flat_in[sample][~kept].abs().max() <= flat_in[sample][kept].abs().min()


def test_sparse_encoding_cuts_bytes(run_filter, features):
    dense = sum(t.numel() * 4 for t in features.values())
    _, dxo = run_filter(TopKSparsify(0.1), features)
    # values (4 B) plus int32 indices (4 B) for 10 % of the values
    assert payload_bytes(dxo) == pytest.approx(0.2 * dense, rel=0.01)


@pytest.mark.parametrize("fraction", [0, 1.5])
def test_bad_fraction_fails_at_construction(fraction):
    with pytest.raises(SplitUNetConfigError):
        TopKSparsify(fraction)
