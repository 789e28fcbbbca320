"""The protected preset's site policy (poc/privacy_protected.json): the protected job meets it and no other shipped
training job does."""

from __future__ import annotations

import json
import shutil

import pytest
from nvflare.apis.workspace import Workspace
from nvflare.private.fed.app.fl_conf import create_privacy_manager

from splitunet.flare.site_minimum import RELEASING_TASKS, released_chain
from splitunet.server.run_settings import TrainingSettings
from splitunet.site.minimum_defense import MINIMUM_DEFENSE_KEY, model_shortfalls, parse_minimum_defense, shortfalls
from splitunet.tools.deployment import bundle_root, find_job

POLICY = bundle_root() / "poc" / "privacy_protected.json"


@pytest.fixture(scope="module")
def scope_filters(tmp_path_factory):
    site = tmp_path_factory.mktemp("site-1")
    (site / "local").mkdir()
    (site / "startup").mkdir()
    shutil.copy(POLICY, site / "local" / "privacy.json")
    manager = create_privacy_manager(Workspace(str(site), "site-1"), names_only=False)
    return manager.default_scope.task_result_filters.get("out", [])


MINIMUM = parse_minimum_defense(json.loads(POLICY.read_text())[MINIMUM_DEFENSE_KEY], POLICY.name)


def _problems(job: str, scope_filters) -> list[str]:
    """What the site's check would find: the released chains of the job under the policy's scope, and its model."""
    job_dir = find_job(job)
    client = json.loads((job_dir / "app/config/config_fed_client.json").read_text())
    server = json.loads((job_dir / "app/config/config_fed_server.json").read_text())
    model = TrainingSettings(**server["workflows"][0]["args"]).model
    problems = model_shortfalls(MINIMUM, model)
    for task in RELEASING_TASKS:
        problems += shortfalls(MINIMUM, released_chain(scope_filters, client, task))
    return problems


def test_the_protected_job_meets_the_protected_policy(scope_filters):
    assert _problems("split_unet_protected", scope_filters) == []


@pytest.mark.parametrize("job", ["split_unet", "split_unet_fp32", "split_unet_no_x0"])
def test_jobs_that_train_the_encoders_or_release_x0_are_refused(job, scope_filters):
    problems = _problems(job, scope_filters)
    assert any("train_encoders True (needs = False)" in problem for problem in problems)
    if job != "split_unet_no_x0":
        assert any(problem.startswith("BlockSkipLevels") for problem in problems)
