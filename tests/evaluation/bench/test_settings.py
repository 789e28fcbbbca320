"""bench.settings: presets from the job's config, and bad arguments refused up front."""

from __future__ import annotations

import pytest
import torch

import splitunet.evaluation.bench.settings as settings_module
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.bench.job_defaults import job_training_args
from splitunet.evaluation.bench.settings import BenchSettings


def test_cpu_preset_measures_the_job_configuration_and_a_smaller_one(tmp_path):
    job = job_training_args()
    settings = BenchSettings.create(tmp_path, device="cpu", flare=False, command=["splitunet", "bench"])
    assert settings.reference.crop_size == tuple(job["crop_size"])
    assert settings.reference.features[:5] == tuple(job["features"][:5])
    assert settings.reference.batch_size == job["batch_size"]
    assert settings.learning_rate == job["learning_rate"]
    crops = [min(size.crop_size) for size in settings.sizes]
    assert crops == sorted(crops) and len(set(crops)) == len(crops)
    assert not settings.run_simulator and not settings.run_poc
    assert settings.command == "splitunet bench"


def test_quick_preset_never_runs_poc(tmp_path):
    settings = BenchSettings.create(tmp_path, quick=True, device="cpu", flare=True, poc=True)
    assert settings.run_simulator and not settings.run_poc
    assert settings.accuracy_iterations < 20


def test_overrides_are_validated(tmp_path):
    settings = BenchSettings.create(tmp_path, quick=True, device="cpu", flare=False, iterations=3, cases=6)
    assert settings.accuracy_iterations == 3 and settings.cases == 6
    with pytest.raises(SplitUNetConfigError, match="accuracy_iterations"):
        BenchSettings.create(tmp_path, quick=True, device="cpu", flare=False, iterations=0)
    with pytest.raises(SplitUNetConfigError, match="cases"):
        BenchSettings.create(tmp_path, quick=True, device="cpu", flare=False, cases=1)


def test_unknown_device_is_a_config_error(tmp_path):
    with pytest.raises(SplitUNetConfigError, match="--device"):
        BenchSettings.create(tmp_path, device="tpu", flare=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is present")
def test_cuda_without_a_gpu_is_a_config_error(tmp_path):
    with pytest.raises(SplitUNetConfigError, match="CUDA"):
        BenchSettings.create(tmp_path, device="cuda", flare=False)


def test_amp_on_a_cpu_is_a_config_error(tmp_path):
    with pytest.raises(SplitUNetConfigError, match="--amp needs a CUDA device"):
        BenchSettings.create(tmp_path, quick=True, device="cpu", flare=False, amp=True)


def test_flare_paths_need_nvflare(tmp_path, monkeypatch):
    monkeypatch.setattr(settings_module, "flare_available", lambda: False)
    with pytest.raises(SplitUNetConfigError, match="--no-flare"):
        BenchSettings.create(tmp_path, quick=True, device="cpu")
    assert not BenchSettings.create(tmp_path, quick=True, device="cpu", flare=False).run_simulator
