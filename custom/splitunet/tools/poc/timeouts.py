"""The bounds of each step of a POC consortium: every wait of the harness ends by one of these."""

from __future__ import annotations

from dataclasses import dataclass

from splitunet.tools.poc.errors import PocError

__all__ = ["PocTimeouts"]


@dataclass(frozen=True)
class PocTimeouts:
    """Upper bounds, in seconds, for each step; every wait of the POC harness ends by one of these.

    Attributes:
        prepare_s: ``nvflare poc prepare`` (provisioning: certificates and startup kits).
        start_s: from starting the processes until every site is connected to the server.
        admin_call_s: one admin command (connect, submit, status, download).
        stop_s: graceful shutdown through the admin API until every process has exited; then they are killed.
        poll_s: pause between two status checks.
    """

    prepare_s: float = 120.0
    start_s: float = 120.0
    admin_call_s: float = 60.0
    stop_s: float = 60.0
    poll_s: float = 1.0

    def __post_init__(self):
        for name in ("prepare_s", "start_s", "admin_call_s", "stop_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise PocError(f"PocTimeouts.{name} must be > 0, got {getattr(self, name)}")
