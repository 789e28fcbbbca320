"""Stand-ins for FLARE's runtime that executor tests share (importable from any test: ``pythonpath`` in pyproject)."""

from __future__ import annotations

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
