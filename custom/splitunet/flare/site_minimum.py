"""The site's check of its minimum defense against the filter chain this job would run on what the site releases.

The chain of a released payload is, in FLARE's order, the filters of the privacy scope the job runs under (the
scope object FLARE puts in the job's context) and then the job's own result filters for that task (from the job's
client config). The site's floor comes from its own ``local/privacy.json`` (see
:mod:`splitunet.site.minimum_defense`); a job that falls short is refused at setup, before any data leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.flare import job_filters
from splitunet.flare.workspace_paths import site_config_dir
from splitunet.site.minimum_defense import (
    MINIMUM_DEFENSE_KEY,
    describe_chain,
    model_shortfalls,
    nopeek_shortfalls,
    parse_minimum_defense,
    shortfalls,
)
from splitunet.site.policy_file import ABSENT, PRIVACY_FILE, policy_entry
from splitunet.wire.protocol import TaskName

__all__ = [
    "RELEASING_TASKS",
    "PRIVACY_FILE",
    "read_minimum_defense",
    "released_chain",
    "released_chains",
    "check_minimum_defense",
]

# The tasks whose results carry the site's features.
RELEASING_TASKS = (TaskName.STEP, TaskName.ENCODE)


def read_minimum_defense(local_dir: Path) -> dict[str, dict] | None:
    """The site's minimum defense from ``<local_dir>/privacy.json``, or ``None`` when it states none."""
    entry = policy_entry(Path(local_dir) / PRIVACY_FILE, MINIMUM_DEFENSE_KEY)
    if entry is ABSENT:
        return None
    return parse_minimum_defense(entry, f"local/{PRIVACY_FILE}")


def released_chain(scope_filters: Sequence, job_config: dict, task: str) -> list:
    """The filters a result of ``task`` goes through: the scope's, then the job's for that task."""
    return list(scope_filters) + job_filters.config_chain(job_config, "task_result_filters", task)


def _scope_and_job(fl_ctx: FLContext) -> tuple[str, list, dict]:
    """The privacy scope's name and result filters, and the job's client config, from a task's context."""
    scope = fl_ctx.get_prop(FLContextKey.SCOPE_OBJECT)
    scope_name = getattr(scope, "name", None) or "none"
    scope_filters = list((getattr(scope, "task_result_filters", None) or {}).get(FilterKey.OUT, []))
    return scope_name, scope_filters, job_filters.job_config(fl_ctx, job_filters.CLIENT_CONFIG)


def released_chains(fl_ctx: FLContext) -> dict[str, list]:
    """The filter chain of each task in :data:`RELEASING_TASKS`, as :func:`released_chain` makes it."""
    _, scope_filters, job_config = _scope_and_job(fl_ctx)
    return {task: released_chain(scope_filters, job_config, task) for task in RELEASING_TASKS}


def check_minimum_defense(
    fl_ctx: FLContext, party: str, model_config: object | None = None, nopeek: object | None = None
) -> str | None:
    """Refuse this job if the chain on any releasing task, or the model settings it asks for, fall short of the
    site's minimum defense.

    Args:
        fl_ctx: the setup task's context.
        party: this site.
        model_config: the model settings the server sent (checked against the minimum's ``SplitModelConfig``).
        nopeek: the site executor's NoPeek settings, ``None`` without (checked against the minimum's ``NoPeek``).

    Returns:
        a line for the site's log saying what was checked, or ``None`` when the site states no minimum.

    Raises:
        SplitUNetConfigError: the shortfall, naming the site, the scope, the task and each missing defense (no data
            path or case: the message goes to the server).
    """
    minimum = read_minimum_defense(site_config_dir(fl_ctx))
    if minimum is None:
        return None
    scope_name, scope_filters, job_config = _scope_and_job(fl_ctx)
    problems = []
    if model_config is not None:
        missing = model_shortfalls(minimum, model_config)
        if missing:
            problems.append(f"the job's model settings: missing {'; '.join(missing)}")
        missing = nopeek_shortfalls(minimum, nopeek, model_config)
        if missing:
            problems.append(f"the site's encoder training: missing {'; '.join(missing)}")
    for task in RELEASING_TASKS:
        chain = released_chain(scope_filters, job_config, task)
        missing = shortfalls(minimum, chain)
        if missing:
            problems.append(f"{task} results would pass {describe_chain(chain)}; missing {'; '.join(missing)}")
    if problems:
        raise SplitUNetConfigError(
            f"site {party} refuses this job: its privacy policy's minimum defense is not met under scope "
            f"{scope_name!r}: " + " | ".join(problems)
        )
    return f"minimum defense {sorted(minimum)} met under scope {scope_name!r} on {list(RELEASING_TASKS)}"
