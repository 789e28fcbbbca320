"""Shared fixtures: a tiny phantom split into party folders (made once per test session); a staging recorder; one
torch thread for modules that ask for it; one quick ``splitunet leakage-splitfed`` run, whose SplitFed training run
the SplitFed job's end-to-end test reads too."""

from __future__ import annotations

import os

import pytest
import torch

from splitunet.compute.devices import THREADS_ENV_VAR
from splitunet.data.partition import partition_msd
from splitunet.data.phantom import generate_phantom


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny networks
    gain nothing from more, and on shared cores waiting OpenMP threads slowed their steps severalfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_parties(tmp_path_factory):
    """Partition of 3 phantom cases of odd shape 34x36x33: folders flair/, t1/, t1gd/, t2/, labels/."""
    root = tmp_path_factory.mktemp("tiny")
    generate_phantom(root / "msd", 3, shape=(34, 36, 33), seed=11, progress=False)
    partition_msd(root / "msd", root / "parties", progress=False)
    return root / "parties"


@pytest.fixture(scope="session")
def splitfed_quick_leakage(tmp_path_factory):
    """``splitunet leakage-splitfed --quick`` run once: its out folder (``report.json``, ``report.md``, and ``run/``,
    the SplitFed job's simulator run: 8 sites, 6 iterations, averaging after 3 and 6, captures on)."""
    from splitunet.tools.cli import main

    out = tmp_path_factory.mktemp("leakage_splitfed")
    assert main(["leakage-splitfed", "--out", str(out), "--quick"]) == 0
    return out


class RecordingStaging:
    """Stands in for a trainer's :class:`~splitunet.compute.host_staging.PinnedStaging`: passes tensors through (as on a
    CPU) and records every crossing as ``(direction, tag, {level: shape})``."""

    def __init__(self):
        self.calls = []

    def _record(self, direction, tensors, tag):
        self.calls.append((direction, tag, {level: tuple(t.shape) for level, t in tensors.items()}))
        return dict(tensors)

    def to_host(self, tensors, tag):
        return self._record("to_host", tensors, tag)

    def to_device(self, tensors, tag):
        return self._record("to_device", tensors, tag)


@pytest.fixture
def recording_staging():
    """A fresh :class:`RecordingStaging`; assign it to a trainer's ``staging``."""
    return RecordingStaging()


def _starts_a_poc_consortium(item) -> bool:
    path = str(item.path)
    return "/tests/tools/poc/" in path or "test_poc_" in path or "test_cli_poc" in path


# Session fixtures that each make a FLARE run several modules read: a worker that runs one of those modules should run
# them all, or the run is made once per worker.
SHARED_RUNS = ("tiny_demo_run", "audited_no_x0_run", "splitfed_quick_leakage")


def pytest_configure(config):
    """Under pytest-xdist (the default, ``-n auto --dist loadgroup``) each worker and every process it starts uses one
    torch thread: the workers already share the cores, and OpenMP threads spinning at barriers for a descheduled peer
    stretched a one-minute run to several."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ[THREADS_ENV_VAR] = "1"
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_xdist_auto_num_workers(config):
    """At most 4 workers: each FLARE run starts up to ten processes of several hundred MB."""
    return max(1, min(4, os.cpu_count() or 1))


def _group_for_parallel_workers(items) -> None:
    """Give each test an ``xdist_group`` so that ``--dist loadgroup`` keeps together what must share a process.

    A module's tests stay together (its module-scoped fixtures are made once); modules that read one of
    :data:`SHARED_RUNS` join one group; every POC test joins one group, which comes first in the collection and so
    runs first on its worker (see :func:`pytest_collection_modifyitems`).
    """
    group_of_module: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        if _starts_a_poc_consortium(item):
            group = "poc"
        else:
            group = next((name for name in SHARED_RUNS if name in item.fixturenames), None)
        if group:
            group_of_module[module] = group
        group_of_module.setdefault(module, module)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of_module[item.nodeid.split("::")[0]]))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Run the POC tests first, and group the tests for parallel workers (:func:`_group_for_parallel_workers`).

    Seen with FLARE 2.9.0: once FOBS has serialized torch tensors in a process (the filter and bench tests do),
    an admin API session opened later in that same process is refused by the POC server ("unauthenticated msg ...
    missing client name"), so the POC never reports its sites as connected. `splitunet poc` and the bench start
    the harness in a fresh process; in the test process, the POC tests simply go first.
    """
    items.sort(key=lambda item: not _starts_a_poc_consortium(item))  # stable: the order is kept otherwise
    _group_for_parallel_workers(items)
