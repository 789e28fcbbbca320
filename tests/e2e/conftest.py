"""Simulator runs that several end-to-end modules read, made once per test session.

Each run costs about half a minute on two cores, nearly all of it FLARE starting its processes, so a run that
answers for tests in more than one module is made here once; the tests only read what it wrote.
"""

from __future__ import annotations

import pytest
from audited_run import audited_run
from tiny_job import TINY_DEMO_PHANTOM, TINY_SERVER_ARGS

from splitunet.tools.demo import DemoSettings, run_demo


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory):
    """The main job as ``splitunet demo`` runs it, at the tiny size: ``(workspace, summary)``."""
    workspace = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(**TINY_DEMO_PHANTOM, server_args=TINY_SERVER_ARGS, timeout_s=600)
    return workspace, run_demo(workspace, settings)


@pytest.fixture(scope="session")
def audited_no_x0_run(tmp_path_factory):
    """``split_unet_no_x0`` audited and captured (:func:`audited_run.audited_run`): its workspace."""
    return audited_run(tmp_path_factory.mktemp("split_unet_no_x0"), "split_unet_no_x0")
