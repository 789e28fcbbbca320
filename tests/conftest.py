"""Shared fixtures: a tiny phantom split into party folders (made once per test session)."""

from __future__ import annotations

import pytest

from splitunet.data.partition import partition_msd
from splitunet.data.phantom import generate_phantom


@pytest.fixture(scope="session")
def tiny_parties(tmp_path_factory):
    """Partition of 3 phantom cases of odd shape 34x36x33: folders flair/, t1/, t1gd/, t2/, labels/."""
    root = tmp_path_factory.mktemp("tiny")
    generate_phantom(root / "msd", 3, shape=(34, 36, 33), seed=11, progress=False)
    partition_msd(root / "msd", root / "parties", progress=False)
    return root / "parties"
