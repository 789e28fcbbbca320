"""bench.settings, preset "128": the realistic crop from the job's widths, step times only, and link runs' sizes."""

from __future__ import annotations

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.bench.job_defaults import job_training_args
from splitunet.evaluation.bench.settings import BenchSettings


def test_preset_128_times_the_split_step_on_volumes_that_leave_crops_room(tmp_path):
    settings = BenchSettings.create(tmp_path, preset="128", device="cpu", flare=False)
    assert settings.preset == "128" and [size.crop_size for size in settings.sizes] == [(128, 128, 128)]
    assert settings.reference.features == tuple(job_training_args()["features"])
    assert all(v > c for v, c in zip(settings.volume_shape, settings.reference.crop_size))
    assert settings.step_arms == ("split_in_process",) and not settings.run_accuracy
    assert settings.flare_iterations - settings.flare_warmup_iterations == settings.timed_steps
    assert settings.to_dict()["link_size"] is None


def test_iterations_bring_the_accuracy_arms_back(tmp_path):
    settings = BenchSettings.create(tmp_path, preset="128", device="cpu", flare=False, iterations=5)
    assert settings.run_accuracy and settings.accuracy_iterations == 5


def test_a_smaller_link_crop_is_timed_in_process_too_and_the_reference_stays(tmp_path):
    settings = BenchSettings.create(
        tmp_path, preset="128", device="cpu", flare=False, link_rates=["1gbit", "100mbit"], link_crop=64
    )
    assert [size.crop_size[0] for size in settings.sizes] == [64, 128]
    assert settings.reference.crop_size == (128, 128, 128) and settings.link_size.crop_size == (64, 64, 64)
    assert settings.link_rates == ("1gbit", "100mbit")
    same = BenchSettings.create(tmp_path, preset="128", device="cpu", flare=False, link_rates=["1gbit"])
    assert len(same.sizes) == 1 and same.link_size == same.reference


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "256"}, "--preset"),
        ({"preset": "128", "quick": True}, "either --quick or --preset"),
        ({"preset": "128", "link_rates": ["fast"]}, "--link-rate"),
        ({"preset": "128", "link_rates": ["1gbit"], "link_crop": 160}, "does not fit the phantom grid"),
    ],
)
def test_bad_preset_and_link_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        BenchSettings.create(tmp_path, device="cpu", flare=False, **kwargs)
