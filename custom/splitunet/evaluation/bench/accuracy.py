"""Dice at an equal iteration budget: centralized, split, split in another wire precision, each modality alone."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from splitunet.evaluation.bench.centralized import CentralizedTrainer
from splitunet.evaluation.bench.phantom_data import BenchData
from splitunet.evaluation.bench.serialization import FeatureSerializer
from splitunet.evaluation.bench.settings import BenchSettings, ProblemSize
from splitunet.evaluation.bench.split_inprocess import InProcessSplit
from splitunet.evaluation.bench.step_timing import planner_for
from splitunet.evaluation.bench.timing import StepClock
from splitunet.evaluation.bench.wire import SimulatedWire
from splitunet.wire.protocol import MODALITIES

__all__ = [
    "accuracy_arms",
    "train_and_validate",
    "comparison_precision",
    "wire_pair",
    "repeated_arms",
    "SINGLE_PREFIX",
    "CENTRALIZED_SAME_ARCHITECTURE",
]

# Arm names of the single-modality baselines are this prefix and the modality.
SINGLE_PREFIX = "single_"
CENTRALIZED_SAME_ARCHITECTURE = "centralized_split_architecture"
# Losses averaged at the end of training, for the report.
_LAST_LOSSES = 10


def comparison_precision(default_precision: str) -> str:
    """The wire precision of the second split arm: float32 when the job sends less, else int8.

    Either way the pair answers whether the cheaper wire costs Dice; the arm is named ``split_<precision>``.
    """
    return "float32" if default_precision != "float32" else "int8"


def wire_pair(default_precision: str) -> tuple[str, str]:
    """The two split arms that differ only in their wire: the job's default and :func:`comparison_precision`."""
    return "split", f"split_{comparison_precision(default_precision)}"


def repeated_arms(default_precision: str) -> tuple[str, ...]:
    """The arms trained from every seed: the wire pair and the equal-capacity centralized arm, so that both Dice
    goals that a single trajectory cannot settle (the wire's cost, split against pooled data) are paired means."""
    return (*wire_pair(default_precision), CENTRALIZED_SAME_ARCHITECTURE)


def accuracy_arms(
    data: BenchData, problem: ProblemSize, settings: BenchSettings, serializer: FeatureSerializer, seed: int
) -> dict[str, Callable[[], object]]:
    """Arm name -> factory of a fresh trainer (built only when its turn comes, to hold one model at a time).

    ``seed`` sets every arm's initial weights (the split parties' and the same-architecture arm's alike).
    """
    config = problem.model_config(settings.learning_rate, settings.weight_decay, seed, settings.transfer_dtype)

    def split(modalities, precision):
        def make():
            wire = SimulatedWire(precision, serializer)
            return InProcessSplit(data, modalities, config, settings.device, settings.loss, wire, amp=settings.amp)

        return make

    arms = {
        "centralized": lambda: CentralizedTrainer(data, config, settings.device, settings.loss, amp=settings.amp),
        # Equal capacity: the split architecture (four encoders, the same decoder) trained on pooled data.
        CENTRALIZED_SAME_ARCHITECTURE: lambda: CentralizedTrainer(
            data, config, settings.device, settings.loss, network="monolithic_split_unet", amp=settings.amp
        ),
        # What the job puts on the wire, as the FLARE arms send it.
        "split": split(MODALITIES, settings.wire_precision),
    }
    other = comparison_precision(settings.wire_precision)
    arms[f"split_{other}"] = split(MODALITIES, other)
    for modality in MODALITIES:
        arms[f"{SINGLE_PREFIX}{modality}"] = split((modality,), settings.wire_precision)
    return arms


def _train_arm(name: str, make, data, problem, settings, seed: int) -> dict:
    arm = make()
    # The crop order follows the seed too: a repeat is another run, not the same one from other weights.
    planner = planner_for(data, problem, seed)
    losses = []
    start = time.perf_counter()
    label = f"train {name}" + (f" (seed {seed})" if seed != settings.seed else "")
    for _ in tqdm(range(settings.accuracy_iterations), desc=label, disable=not settings.progress):
        losses.append(arm.step(planner.next_plan(), StepClock(settings.device)))
    trained = time.perf_counter()
    dice = arm.validate(problem.crop_size, settings.sw_batch_size, settings.sw_overlap)
    result = {
        "dice": dice,
        "final_loss": float(np.mean(losses[-_LAST_LOSSES:])),
        "train_s": trained - start,
        "validate_s": time.perf_counter() - trained,
    }
    del arm
    gc.collect()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def train_and_validate(
    data: BenchData, problem: ProblemSize, settings: BenchSettings, serializer: FeatureSerializer
) -> dict:
    """Train every arm for ``settings.accuracy_iterations`` on the same crops, then score the held-out cases.

    With ``settings.accuracy_seeds`` > 1, the arms of :func:`repeated_arms` are trained again from other seeds
    (initial weights and crop order), so the wire's cost in Dice and the split's gap to pooled training are means
    of paired runs rather than one trajectory.

    Returns:
        ``{"iterations": n, "size": ..., "val_cases": k, "seeds": [...], "arms": {name: {"dice": {...},
        "final_loss": f, "train_s": s, "validate_s": s}}}``; the repeated arms also hold ``"repeats": [{"seed",
        "dice", "final_loss", ...}, ...]``, their first entry the main run.
    """
    seeds = [settings.seed + k for k in range(settings.accuracy_seeds)]
    paired = repeated_arms(settings.wire_precision)
    results = {}
    for seed in seeds:
        arms = accuracy_arms(data, problem, settings, serializer, seed)
        # Every arm from the first seed; only the repeated arms again from the others.
        for name in arms if seed == seeds[0] else paired:
            result = _train_arm(name, arms[name], data, problem, settings, seed)
            run = {"seed": seed, **result}
            if seed == seeds[0]:
                results[name] = result
            if name in paired:
                results[name].setdefault("repeats", []).append(run)
    return {
        "iterations": settings.accuracy_iterations,
        "size": problem.to_dict(),
        "val_cases": len(data.val_keys),
        "train_cases": len(data.train_keys),
        "seeds": seeds,
        "arms": results,
    }
