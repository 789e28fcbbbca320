"""The workflows' constructors: what the job configs pass, checked by the run settings as FLARE builds them."""

from __future__ import annotations

import inspect
import json
from dataclasses import MISSING, fields

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.flare.controller import SplitLearningController
from splitunet.flare.inference_controller import SplitInferenceController
from splitunet.flare.site_tasks import SiteTaskController
from splitunet.server.run_settings import InferenceSettings, TaskSettings, TrainingSettings
from splitunet.tools.deployment import bundle_root

WORKFLOWS = [
    (SplitLearningController, TrainingSettings),
    (SplitInferenceController, InferenceSettings),
    (SiteTaskController, TaskSettings),
]


def _settings_defaults(settings_class) -> dict:
    return {spec.name: spec.default for spec in fields(settings_class) if spec.init and spec.default is not MISSING}


@pytest.mark.parametrize("workflow, settings_class", WORKFLOWS)
def test_every_argument_is_a_setting_with_the_same_default(workflow, settings_class):
    parameters = inspect.signature(workflow.__init__).parameters
    arguments = {name: p.default for name, p in parameters.items() if name != "self"}
    defaults = _settings_defaults(settings_class)
    if workflow is SplitInferenceController:
        defaults.pop("on_site_failure")  # inference always stops when a site fails
    assert arguments == defaults


def test_the_training_defaults_are_the_shipped_ones():
    controller = SplitLearningController()
    settings = controller.settings
    assert settings.on_site_failure == "stop" and settings.resume is False and settings.checkpoint_every == 0
    assert controller.model_config.features == (8, 16, 32, 64, 128, 8) and controller.model_config.learning_rate == 2e-3


@pytest.mark.parametrize(
    "config", sorted((bundle_root() / "jobs").glob("*/app/config/config_fed_server.json")), ids=lambda p: p.parts[-4]
)
def test_every_shipped_job_builds_its_workflows(config):
    from nvflare.fuel.utils.class_utils import load_class

    for workflow in json.loads(config.read_text())["workflows"]:
        controller = load_class(workflow["path"])(**workflow["args"])
        if workflow["path"] == "splitunet.horizontal.DriftCorrectedFedAvg":
            # FLARE's FedAvg with our correction: FLARE keeps its own arguments, ours is built at construction.
            assert controller.correction is not None
        elif workflow["path"].startswith("splitunet."):
            # Ours keep every argument in their checked settings (FLARE's own workflows keep them as they like).
            assert all(hasattr(controller.settings, name) for name in workflow["args"]), workflow["path"]


@pytest.mark.parametrize(
    "workflow, kwargs, message",
    [
        (SplitLearningController, {"crop_size": [16, 48, 48]}, "crop_size must be three ints >= 32"),
        (SplitLearningController, {"on_site_failure": "continue"}, "need fusion='mean'"),
        (SplitLearningController, {"task_long_poll_s": 60}, "task_long_poll_s must be a number of seconds"),
        (SplitLearningController, {"pipeline_delay": 2}, "pipeline_delay must be one of"),
        (SplitInferenceController, {"checkpoint": "latest"}, "checkpoint must be one of"),
        (SiteTaskController, {"on_site_failure": "retry"}, "on_site_failure must be one of"),
    ],
)
def test_malformed_arguments_fail_when_the_workflow_is_built(workflow, kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        workflow(**kwargs)


def test_mean_fusion_allows_dropout_and_continuing():
    controller = SplitLearningController(fusion="mean", on_site_failure="continue", modality_dropout=0.3)
    assert controller.settings.modality_dropout == 0.3
