"""Seconds per training iteration of the in-process arms at one problem size, and the bytes one iteration moves."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from splitunet.data.sampling import RandomCropPlanner
from splitunet.evaluation.bench.centralized import CentralizedTrainer
from splitunet.evaluation.bench.phantom_data import BenchData
from splitunet.evaluation.bench.serialization import FeatureSerializer
from splitunet.evaluation.bench.settings import BenchSettings, ProblemSize
from splitunet.evaluation.bench.split_inprocess import InProcessSplit
from splitunet.evaluation.bench.timing import StepClock, StepTimes
from splitunet.evaluation.bench.wire import SimulatedWire
from splitunet.evaluation.bench.wire_bytes import byte_table
from splitunet.wire.codec import EncodedLevel
from splitunet.wire.protocol import MODALITIES

__all__ = ["time_problem_size", "STEP_ARMS", "planner_for"]

# What each timed arm is, for the report.
STEP_ARMS = {
    "centralized": "MONAI BasicUNet, 4-channel input, one process",
    "monolithic_split_unet": "the split architecture (4 encoders + decoder) in one autograd graph, no wire",
    "split_in_process": "4 SiteTrainers + ServerTrainer, tensors through the simulated wire, no FLARE",
}


def planner_for(data: BenchData, problem: ProblemSize, seed: int) -> RandomCropPlanner:
    """The crop planner the FLARE server would use on the training cases: every arm sees the same crops."""
    shapes = {key: data.shapes[key] for key in data.train_keys}
    return RandomCropPlanner(shapes, problem.crop_size, problem.batch_size, seed=seed)


def _run_steps(arm, planner: RandomCropPlanner, settings: BenchSettings, label: str, on_warm: Callable | None = None):
    times = StepTimes(settings.warmup_steps)
    total = settings.warmup_steps + settings.timed_steps
    for index in tqdm(range(total), desc=label, unit="step", disable=not settings.progress, leave=False):
        if index == settings.warmup_steps and on_warm is not None:
            on_warm()
        clock = StepClock(settings.device)
        arm.step(planner.next_plan(), clock)
        times.record(clock.finish())
    return times.mean()


def _dense(value):
    return value.decode() if isinstance(value, EncodedLevel) else value


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_problem_size(
    data: BenchData, problem: ProblemSize, settings: BenchSettings, serializer: FeatureSerializer
) -> dict:
    """Mean step time of each arm of ``settings.step_arms`` at ``problem``, with its parts, and the byte table of one
    split iteration.

    Returns:
        ``{"size": ..., "step_time_s": {arm: {part: seconds, "total": seconds, ...}}, "bytes_per_iteration": ...,
        "pcie_bytes_per_iteration": ...}``; the last is the bytes the split arm's parties copied between device and
        host per timed step (crops, labels, features, gradients; ``None`` on a CPU, where nothing is copied).
    """
    config = problem.model_config(settings.learning_rate, settings.weight_decay, settings.seed, settings.transfer_dtype)
    step_times = {}
    for network in ("centralized", "monolithic_split_unet"):
        if network not in settings.step_arms:
            continue
        arm = CentralizedTrainer(
            data,
            config,
            settings.device,
            settings.loss,
            network="basic_unet" if network == "centralized" else network,
            amp=settings.amp,
        )
        step_times[network] = _run_steps(arm, planner_for(data, problem, settings.seed), settings, network)
        del arm
        _release(settings.device)

    wire = SimulatedWire(settings.wire_precision, serializer)
    split = InProcessSplit(data, MODALITIES, config, settings.device, settings.loss, wire, amp=settings.amp)
    counted = {}
    pcie_bytes = split.pcie_bytes

    def start_counting():
        counted["serialized"] = wire.serialized_bytes
        counted["pcie"] = pcie_bytes()

    step_times["split_in_process"] = _run_steps(
        split, planner_for(data, problem, settings.seed), settings, "split", start_counting
    )
    # The byte table counts every precision from dense tensors: codes the senders made are decoded for it.
    sent = [{level: _dense(value) for level, value in up.items()} for up in split.last_up]
    returned = [{level: _dense(value) for level, value in down.items()} for down in split.last_down]
    table = byte_table(sent, returned)
    pcie = (pcie_bytes() - counted["pcie"]) / settings.timed_steps if settings.device.type == "cuda" else None
    # What the serializer produced, headers included, in the job's wire precision (both directions, all sites).
    table["serialized_both"] = (wire.serialized_bytes - counted["serialized"]) / settings.timed_steps
    del split
    _release(settings.device)
    return {
        "size": problem.to_dict(),
        "step_time_s": step_times,
        "bytes_per_iteration": table,
        "pcie_bytes_per_iteration": pcie,
        "serializer": serializer.name,
    }
