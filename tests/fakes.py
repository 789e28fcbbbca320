"""Stand-ins for FLARE's runtime that executor tests share (importable from any test: ``pythonpath`` in pyproject)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace


class WorkspaceEngine:
    """What an executor asks of FLARE's engine: the workspace, somewhere to fire events, and fresh contexts.

    Args:
        workspace: the party's FLARE workspace.
    """

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.events = []

    def get_workspace(self) -> Workspace:
        return self.workspace

    def fire_event(self, event_type, fl_ctx):
        self.events.append(event_type)

    def new_context(self) -> FLContext:
        # The analytics event (the epsilon for TensorBoard) is fired in a fresh context.
        return FLContext()


def server_filter_context(site: str, direction: str) -> FLContext:
    """The context of a server-side filter call on data to (``FilterKey.OUT``) or from (``FilterKey.IN``) ``site``,
    as FLARE sets it up: the peer's identity and the chain's direction."""
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey

    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    context = FLContext()
    context.set_peer_context(peer)
    context.set_prop(FLContextKey.FILTER_DIRECTION, direction, private=True, sticky=False)
    return context


def t1gd_site_context(tmp_path: Path, tiny_parties: Path, privacy: Mapping | None = None) -> FLContext:
    """The context of ``site-3`` (T1gd of the ``tiny_parties`` fixture's data) running job ``job-1`` in a FLARE
    workspace under ``tmp_path``, with ``privacy`` as its ``local/privacy.json`` (none if ``None``)."""
    from nvflare.apis.fl_constant import ReservedKey

    root = tmp_path / "workspace"
    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True)
    settings = {
        "case_key_secret": "test-secret",
        "parties": {"site-3": {"modality": "t1gd", "data_dir": str(tiny_parties / "t1gd")}},
    }
    (root / "local" / "splitunet_site.json").write_text(json.dumps(settings))
    if privacy is not None:
        (root / "local" / "privacy.json").write_text(json.dumps(dict(privacy)))
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, WorkspaceEngine(Workspace(str(root), "site-3")), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-3", private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    return fl_ctx


def one_training_step(executor, fl_ctx: FLContext, make_gradient) -> tuple:
    """One training step of the ``t1gd_site_context`` site through ``executor``: a forward task on two crops of its
    first case, then the gradients ``make_gradient(shape)`` for the levels x1-x4 of the executor tests' model
    (features 4, 4, 8, 8, 16 without x0, 32³ crops).

    Returns:
        the replies to the forward and the gradient tasks.
    """
    from nvflare.apis.signal import Signal

    from splitunet.wire.protocol import DataKind, MetaKey, TaskName
    from splitunet.wire.transport import control_dxo, features_to_dxo

    def run(meta, dxo=None):
        return executor.execute(TaskName.STEP, (dxo or control_dxo(meta)).to_shareable(), fl_ctx, Signal())

    key = sorted(executor.trainer.key_to_case)[0]
    plan = {"keys": [key, key], "origins": [[0, 0, 0], [2, 4, 1]], "size": [32, 32, 32], "flips": [[False] * 3] * 2}
    features = run({MetaKey.ITERATION: 1, MetaKey.PLAN: plan})
    grads = {level: make_gradient((2, f, *(32 >> level,) * 3)) for level, f in zip((1, 2, 3, 4), (4, 8, 8, 16))}
    meta = {MetaKey.ITERATION: 2, MetaKey.PLAN: None}
    return features, run(meta, features_to_dxo(grads, DataKind.GRADIENTS, meta))
