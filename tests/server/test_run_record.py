"""server.run_record: what results.json holds as a run goes on, under the keys its readers use."""

from __future__ import annotations

import math

import pytest

from splitunet.server.run_record import InferenceRecord, RunRecord, TrainingRecord

DICE = {"TC": 0.5, "WT": 0.7, "ET": 0.3, "mean": 0.5}
TRAINING_KEYS = [
    "status",
    "iterations",
    "left_out_cases",
    "val_cases",
    "sites",
    "num_train_cases",
    "num_val_cases",
    "model",
    "crop_size",
    "batch_size",
    "server_compute",
    "history",
    "loss_curve",
    "dropped_sites",
    "checkpoints",
    "filters",
    "dice",
    "best",
    "dice_without",
    "predictions",
    "activation_bytes_per_iteration",
    "timing_per_iteration_s",
    "task_dispatch_per_iteration_s",
]


def _started() -> TrainingRecord:
    record = TrainingRecord()
    record.left_out_cases = {}
    record.val_cases = ["BRATS_002"]
    record.start(
        sites={"site-1": "flair"},
        num_train_cases=3,
        num_val_cases=1,
        model={"fusion": "mean"},
        crop_size=[32, 32, 32],
        batch_size=2,
        server_compute={"device": "cpu", "amp": False, "amp_requested": False},
    )
    return record


def test_a_new_record_says_running_and_a_failed_one_ends_with_the_error():
    record = TrainingRecord()
    assert record.to_json() == {"status": "running", "iterations": 0}
    record.fail(ValueError("site site-2 did not answer"))
    assert list(record.to_json()) == ["status", "iterations", "error"]
    assert record.to_json()["status"] == "failed" and record.to_json()["error"] == "site site-2 did not answer"
    for aborted, status in ((False, "completed"), (True, "aborted")):
        done = RunRecord()
        done.finish(aborted)
        assert done.to_json() == {"status": status, "iterations": 0}


def test_a_completed_training_run_writes_every_key_in_order():
    record = _started()
    record.note_filters("site-1", [{"filter": "FeatureGuard", "party": "site-1", "call": 1, "obj": object()}])
    record.add_step(0.9, site_s=0.5, server_s=0.2, round_trip_s=1.0, activation_bytes=1000, dispatched=[0.01, 0.03])
    record.iterations = 1
    assert record.add_validation(1, 0.9, DICE)
    record.add_checkpoint("last", "/ck/decoder_last.pt")
    record.add_checkpoint("last", "/ck/encoder_flair_last.pt", site="site-1")
    record.dice_without = {"flair": DICE}
    record.predictions = {"BRATS_002": "/run/predictions/BRATS_002.nii.gz"}
    record.summarise_steps()
    record.finish(aborted=False)
    results = record.to_json()
    assert list(results) == TRAINING_KEYS
    assert results["status"] == "completed" and results["iterations"] == 1
    assert results["history"] == [{"iteration": 1, "loss": 0.9, "dice": DICE}]
    assert results["best"] == {"iteration": 1, "dice": DICE} and results["dice"] == DICE
    assert results["checkpoints"] == {
        "server": {"last": "/ck/decoder_last.pt"},
        "sites": {"site-1": {"last": "/ck/encoder_flair_last.pt"}},
    }
    assert results["filters"] == {
        "site-1": {
            "FeatureGuard@site-1": {"calls": 1, "last": {"filter": "FeatureGuard", "party": "site-1", "call": 1}}
        }
    }
    assert results["dropped_sites"] == [] and results["loss_curve"] == [0.9]


def test_timing_means_over_the_timed_steps():
    record = _started()
    assert record.add_step(1.0, 0.5, 0.25, 1.0, 100, [0.1, 0.3]) == (0.5, 0.25, 0.5)
    # The waiting share never goes below zero (site compute is measured at the site, the round trip here).
    assert record.add_step(1.0, 1.5, 0.75, 1.0, 300, []) == (1.5, 0.75, 0.0)
    record.summarise_steps()
    assert record.timing_per_iteration_s == {"site_compute": 1.0, "server_compute": 0.5, "waiting_transfer": 0.25}
    assert record.activation_bytes_per_iteration == 200.0
    assert record.task_dispatch_per_iteration_s == pytest.approx({"first_site": 0.1, "last_site": 0.3})


def test_no_timed_step_means_zeros_and_no_dispatch():
    record = _started()
    record.summarise_steps()
    assert record.timing_per_iteration_s == {"site_compute": 0.0, "server_compute": 0.0, "waiting_transfer": 0.0}
    assert record.activation_bytes_per_iteration == 0.0 and "task_dispatch_per_iteration_s" not in record.to_json()


def test_best_is_the_highest_mean_dice_and_nan_never_is():
    record = _started()
    assert not record.add_validation(2, 1.0, {**DICE, "mean": math.nan}) and record.best is None
    assert record.add_validation(4, 0.8, DICE)
    assert not record.add_validation(6, 0.7, {**DICE, "mean": 0.4})
    assert record.best == {"iteration": 4, "dice": DICE} and record.dice["mean"] == 0.4


def test_filter_trails_are_counted_per_site_and_filter():
    record = RunRecord()
    record.note_filters("site-2", None)
    for call in (1, 2):
        record.note_filters("site-1", [{"filter": "Quantize", "party": "site-1", "call": call}, {"filter": "Guard"}])
    assert record.filters["site-2"] == {}
    assert record.filters["site-1"]["Quantize@site-1"] == {
        "calls": 2,
        "last": {"filter": "Quantize", "party": "site-1", "call": 2},
    }
    assert record.filters["site-1"]["Guard@?"]["calls"] == 2


def test_what_a_checkpoint_keeps_comes_back_on_resume():
    record = _started()
    record.add_step(0.9, 0.1, 0.1, 0.2, 10, [])
    record.drop([{"site": "site-2", "modality": "t1", "iteration": 1, "reason": "silent"}])
    saved = record.resumable()
    assert sorted(saved) == ["dropped_sites", "history", "loss_curve"]  # no validation yet: no best, no dice
    resumed = _started()
    resumed.resumed_from = {"iteration": 1, "checkpoint": "/ck/decoder_last.pt"}
    resumed.restore(saved, 1)
    assert resumed.iterations == 1 and resumed.loss_curve == [0.9] and resumed.dropped_sites == saved["dropped_sites"]
    assert list(resumed.to_json())[:3] == ["status", "iterations", "resumed_from"]


def test_inference_record_keys():
    record = InferenceRecord()
    record.model, record.layout, record.roi_size = {"checkpoint": "/ck/decoder_best.pt"}, "msd", [32, 32, 32]
    record.left_out_cases, record.absent_modalities = {}, ["t2"]
    record.note_filters("site-1", [])
    record.predictions = {"abc": {"file": "/run/predictions/abc.nii.gz", "voxels": {"TC": 1, "WT": 2, "ET": 0}}}
    record.finish(aborted=False)
    assert list(record.to_json()) == [
        "status",
        "iterations",
        "model",
        "layout",
        "roi_size",
        "left_out_cases",
        "absent_modalities",
        "filters",
        "predictions",
    ]
