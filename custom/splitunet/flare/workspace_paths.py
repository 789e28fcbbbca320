"""Where a party keeps its outputs inside its own FLARE workspace."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_context import FLContext

__all__ = ["run_dir", "site_config_dir"]


def run_dir(fl_ctx: FLContext) -> Path:
    """This job's run folder in this party's workspace (checkpoints and results go under it)."""
    return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))


def site_config_dir(fl_ctx: FLContext) -> Path:
    """This party's ``local/`` folder, where site administrators put site-local settings."""
    return Path(fl_ctx.get_engine().get_workspace().get_site_config_dir())
