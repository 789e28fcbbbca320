"""bench.job_defaults: the main job's settings, read without FLARE."""

from __future__ import annotations

import json
import shutil

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.bench.job_defaults import job_training_args, job_wire_precision, main_job_dir


def test_main_job_settings_are_its_workflow_args():
    config = json.loads((main_job_dir() / "app" / "config" / "config_fed_server.json").read_text())
    assert job_training_args() == config["workflows"][0]["args"]


def test_main_job_sends_int8_and_the_reference_its_transfer_dtype():
    assert job_wire_precision() == "int8"
    reference = main_job_dir("split_unet_fp32")
    assert job_wire_precision(reference) == job_training_args(reference).get("transfer_dtype", "float32")


def test_a_quantizing_filter_sets_the_wire_precision(tmp_path):
    job = shutil.copytree(main_job_dir("split_unet_fp32"), tmp_path / "job")
    path = job / "app" / "config" / "config_fed_client.json"
    config = json.loads(path.read_text())
    config["task_result_filters"][0]["filters"].append(
        {"path": "splitunet.filters.QuantizeFeatures", "args": {"precision": "float16"}}
    )
    path.write_text(json.dumps(config))
    assert job_wire_precision(job) == "float16"


def test_a_folder_without_a_server_config_is_refused(tmp_path):
    with pytest.raises(SplitUNetConfigError, match="config_fed_server"):
        job_training_args(tmp_path)
