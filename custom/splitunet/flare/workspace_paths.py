"""Where a party keeps its outputs inside its own FLARE workspace."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_context import FLContext

__all__ = ["run_dir", "site_config_dir", "checkpoint_folder"]


def run_dir(fl_ctx: FLContext) -> Path:
    """This job's run folder in this party's workspace (checkpoints and results go under it)."""
    return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))


def site_config_dir(fl_ctx: FLContext) -> Path:
    """This party's ``local/`` folder, where site administrators put site-local settings."""
    return Path(fl_ctx.get_engine().get_workspace().get_site_config_dir())


def checkpoint_folder(fl_ctx: FLContext, checkpoint_dir: Path | None, experiment: str) -> Path:
    """Where this party keeps its checkpoints of ``experiment``.

    ``<checkpoint_dir>/<experiment>/`` when the party's settings name a ``checkpoint_dir`` (it outlives the job,
    so a later job can resume from it), else ``<run folder>/models/`` of this job.
    """
    if checkpoint_dir is None:
        return run_dir(fl_ctx) / "models"
    return Path(checkpoint_dir) / experiment
