"""Fixtures of the benchmark tests: the tiny phantom partition as benchmark data."""

from __future__ import annotations

import pytest

from splitunet.data.case_keys import keys_to_case_ids
from splitunet.data.party_data import LabelFolder
from splitunet.evaluation.bench.phantom_data import BenchData

SECRET = "bench-test-secret"


@pytest.fixture(scope="module")
def tiny_bench_data(tiny_parties):
    """The session's 3 tiny phantom cases (34x36x33) as :class:`BenchData`: 2 for training, 1 held out."""
    labels = LabelFolder(tiny_parties / "labels", party="test-server")
    key_to_case = keys_to_case_ids(labels.case_ids, SECRET, party="test-server")
    keys = sorted(key_to_case)
    shapes = {key: tuple(labels.describe(key_to_case[key])["shape"]) for key in keys}
    return BenchData(
        data_dir=tiny_parties.parent,
        parties=tiny_parties,
        secret=SECRET,
        train_keys=keys[:2],
        val_keys=keys[2:],
        shapes=shapes,
        volume_shape=shapes[keys[0]],
    )
