"""The generated ``fedavg_unet`` job: FLARE's FedAvg and persistor around the split job's model and training settings,
every component buildable from the config as written."""

from __future__ import annotations

import importlib

import pytest
import torch

from splitunet.errors import SplitUNetConfigError
from splitunet.horizontal import FedAvgHospitalExecutor, FedAvgUNet
from splitunet.tools.jobs import generate_jobs

JOB = "fedavg_unet"
GENERATED = generate_jobs()
SPLIT = GENERATED["split_unet/app/config/config_fed_server.json"]["workflows"][0]["args"]
SERVER = GENERATED[f"{JOB}/app/config/config_fed_server.json"]
CLIENT = GENERATED[f"{JOB}/app/config/config_fed_client.json"]
COMPONENTS = {component["id"]: component for component in SERVER["components"]}
EXECUTOR = CLIENT["executors"][0]
# What decides what is learned, the same in both settings.
SHARED = (
    "batch_size",
    "crop_size",
    "features",
    "skip_levels",
    "fusion",
    "loss",
    "learning_rate",
    "num_val_cases",
    "sw_batch_size",
    "seed",
)


def _build(entry: dict):
    module, name = entry["path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**entry["args"])


def test_the_hospitals_train_with_the_split_jobs_settings_for_as_many_steps():
    args = EXECUTOR["executor"]["args"]
    assert {name: args[name] for name in SHARED} == {name: SPLIT[name] for name in SHARED}
    fedavg = SERVER["workflows"][0]["args"]
    assert fedavg["num_rounds"] * args["local_iterations"] == SPLIT["num_iterations"]
    # The global model is scored where the split job validates: after val_every iterations, and at the end.
    assert args["val_every"] * args["local_iterations"] == SPLIT["val_every"]


def test_the_server_builds_the_same_network_the_hospitals_train():
    model = COMPONENTS["model"]
    assert model["path"] == "splitunet.horizontal.FedAvgUNet"
    args = EXECUTOR["executor"]["args"]
    assert model["args"] == {name: args[name] for name in ("features", "skip_levels", "fusion", "seed")}
    built = _build(model)
    assert isinstance(built, FedAvgUNet)
    hospital = FedAvgUNet(args["features"], args["skip_levels"], args["fusion"], args["seed"])
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in hospital.state_dict().items()}
    assert torch.equal(
        built.state_dict()["decoder.final_conv.weight"], hospital.state_dict()["decoder.final_conv.weight"]
    )


def test_flares_fedavg_persists_and_global_model_eval_scores_the_final_model():
    fedavg, evaluation = SERVER["workflows"]
    assert fedavg["path"] == "nvflare.app_common.workflows.fedavg.FedAvg"
    assert evaluation["path"] == "nvflare.app_common.workflows.global_model_eval.GlobalModelEval"
    persistor = COMPONENTS[fedavg["args"]["persistor_id"]]
    assert persistor["path"] == "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"
    assert COMPONENTS[persistor["args"]["model"]] is COMPONENTS["model"]
    locator = COMPONENTS[evaluation["args"]["model_locator_id"]]
    assert COMPONENTS[locator["args"]["pt_persistor_id"]] is persistor
    # Every entry builds with the installed FLARE (argument names as it spells them).
    workflows = [_build(entry) for entry in SERVER["workflows"]]
    assert workflows[0].num_rounds == fedavg["args"]["num_rounds"] and workflows[0].task_name == "train"
    assert workflows[1]._validation_task_name == "validate"
    for entry in SERVER["components"]:
        _build(entry)


def test_the_hospitals_executor_takes_both_tasks_and_builds_from_the_config():
    assert EXECUTOR["tasks"] == ["train", "validate"]
    executor = _build(EXECUTOR["executor"])
    assert isinstance(executor, FedAvgHospitalExecutor)
    assert executor.settings.crop_size == tuple(SPLIT["crop_size"])
    # FLARE's own workflows carry weights, not split-learning features: no filter chains.
    for config in (SERVER, CLIENT):
        assert config["task_data_filters"] == [] and config["task_result_filters"] == []


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"local_iterations": 0}, "local_iterations must be an int >= 1"),
        ({"val_every": -1}, "val_every must be an int >= 0"),
        ({"num_threads": 1.5}, "num_threads must be an int >= 0"),
        ({"max_cached_cases": -1}, "max_cached_cases must be an int >= 0"),
        ({"crop_size": [16, 16, 16]}, "crop_size must be three ints >= 32"),
        ({"learning_rte": 0.1}, "unknown hospital executor argument.*learning_rte"),
    ],
)
def test_a_malformed_executor_argument_is_named(changes, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        FedAvgHospitalExecutor(**{**EXECUTOR["executor"]["args"], **changes})


def test_every_class_the_job_names_is_on_flares_default_allow_list_or_named_by_the_package():
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
    from nvflare.fuel.utils.class_utils import load_class

    from splitunet.horizontal import HOSPITAL_CLASSES

    named = {entry["path"] for entry in (*SERVER["components"], *SERVER["workflows"])}
    named.add(EXECUTOR["executor"]["path"])
    # The DWCS variant's workflow is the only package class this job does not name.
    dwcs_workflow = {"splitunet.horizontal.DriftCorrectedFedAvg"}
    assert named - set(DEFAULT_CLASS_ALLOW_LIST) == set(HOSPITAL_CLASSES) - dwcs_workflow
    for path in HOSPITAL_CLASSES:
        load_class(path)


def test_the_dp_variant_differs_only_in_the_hospitals_dp_settings_and_their_epsilon_in_tensorboard():
    from splitunet.dp import DPSettings

    dp_client = GENERATED["fedavg_unet_dp/app/config/config_fed_client.json"]
    dp_server = GENERATED["fedavg_unet_dp/app/config/config_fed_server.json"]
    # Each hospital's epsilon travels to the server's TensorBoard: a receiver there, an event converter at each.
    *components, receiver = dp_server["components"]
    assert {**dp_server, "components": components} == SERVER
    assert receiver["path"].endswith("TBAnalyticsReceiver")
    (converter,) = dp_client["components"]
    assert converter["path"].endswith("ConvertToFedEvent")
    assert converter["args"]["events_to_convert"] == ["analytix_log_stats"]
    assert GENERATED["fedavg_unet_dp/meta.json"] == {**GENERATED[f"{JOB}/meta.json"], "name": "fedavg_unet_dp"}
    executor = dp_client["executors"][0]["executor"]
    dp = executor["args"]["dp"]
    assert {**executor, "args": {k: v for k, v in executor["args"].items() if k != "dp"}} == EXECUTOR["executor"]
    assert {k: v for k, v in dp_client.items() if k not in ("executors", "components")} == {
        k: v for k, v in CLIENT.items() if k not in ("executors", "components")
    }
    # Poisson sampling and a whole-job target: what the accountant assumes, and one epsilon per hospital.
    assert dp["poisson_sampling"] is True and "target_epsilon" in dp and "noise_multiplier" not in dp
    assert _build(executor).settings.dp == DPSettings(**dp)
