"""What a server workflow records about its run, written as ``results.json`` in the server's run folder.

The demo, the benchmark, the sweeps, the leakage evaluation and the end-to-end tests read these files, so every key
keeps its name and meaning. A field that is ``None`` has not been reached (yet) and is left out of the file: a run
that fails at setup has no ``history``; ``best`` appears with the first validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = ["RunRecord", "StepTiming", "TrainingRecord", "InferenceRecord", "RESUMED_KEYS"]

# The parts of a training record that a checkpoint carries, so that a resumed run reports the whole history.
RESUMED_KEYS = ("history", "loss_curve", "best", "dice", "hd95", "dropped_sites", "encoder_averaging")


@dataclass
class StepTiming:
    """Sums over the timed training steps, for the means ``results.json`` reports.

    Attributes:
        site_compute_s: the slowest site's own compute, per step.
        server_compute_s: the server's decoder step.
        waiting_transfer_s: the rest of the round trip (FLARE, filters, serialisation, waiting).
        steps: how many steps were timed.
        activation_bytes: feature bytes received, as they arrived after every site filter.
        dispatch: per step, seconds from scheduling until the first and the last site took its task.
    """

    site_compute_s: float = 0.0
    server_compute_s: float = 0.0
    waiting_transfer_s: float = 0.0
    steps: int = 0
    activation_bytes: int = 0
    dispatch: list[tuple[float, float]] = field(default_factory=list)

    def add(
        self, site_s: float, server_s: float, round_trip_s: float, activation_bytes: int, dispatched: Sequence[float]
    ) -> tuple[float, float, float]:
        """Add one step; returns its ``(site compute, server compute, waiting/transfer)`` seconds."""
        split = (site_s, server_s, max(round_trip_s - site_s, 0.0))
        self.site_compute_s += split[0]
        self.server_compute_s += split[1]
        self.waiting_transfer_s += split[2]
        self.steps += 1
        self.activation_bytes += activation_bytes
        if dispatched:
            self.dispatch.append((min(dispatched), max(dispatched)))
        return split

    def mean(self) -> dict[str, float]:
        """Mean seconds per timed step (zeros before the first)."""
        steps = max(self.steps, 1)
        return {
            "site_compute": self.site_compute_s / steps,
            "server_compute": self.server_compute_s / steps,
            "waiting_transfer": self.waiting_transfer_s / steps,
        }


@dataclass
class RunRecord:
    """What every workflow records: how the run ended, the sites' filters, the cases left out.

    Attributes:
        status: ``"running"``, then ``"completed"``, ``"aborted"`` or ``"failed"``.
        iterations: training iterations done (0 at inference).
        left_out_cases: per party, how many cases it lacks that others have.
        filters: per site and ``filter@party``, how many received DXOs went through that filter and its last record.
        dropped_sites: the sites dropped during the run (``on_site_failure="continue"``), with iteration and reason.
        error: why the run failed.
    """

    # The results.json keys, in the order a run reaches them (the order of the file).
    KEYS: ClassVar[tuple[str, ...]] = ("status", "iterations", "left_out_cases", "dropped_sites", "filters", "error")

    status: str = "running"
    iterations: int = 0
    left_out_cases: dict[str, int] | None = None
    filters: dict[str, dict] | None = None
    dropped_sites: list[dict] | None = None
    error: str | None = None

    def note_filters(self, site: str, trail: Sequence[Mapping] | None) -> None:
        """Count the filters a DXO from ``site`` went through (its filter trail); the site appears even without."""
        if self.filters is None:
            self.filters = {}
        per_site = self.filters.setdefault(site, {})
        for record in trail or ():
            where = f"{record.get('filter', '?')}@{record.get('party', '?')}"
            entry = per_site.setdefault(where, {"calls": 0})
            entry["calls"] += 1
            entry["last"] = {k: v for k, v in record.items() if isinstance(v, (int, float, str, list, dict))}

    def drop(self, dropped: Sequence[Mapping]) -> None:
        """Record every site dropped so far (the roster's records)."""
        self.dropped_sites = [dict(record) for record in dropped]

    def finish(self, aborted: bool) -> None:
        """The run ended without error."""
        self.status = "aborted" if aborted else "completed"

    def fail(self, error: BaseException | str) -> None:
        """The run stopped on ``error``."""
        self.status, self.error = "failed", str(error)

    def to_json(self) -> dict:
        """The content of ``results.json``: every key reached so far."""
        return {key: getattr(self, key) for key in self.KEYS if getattr(self, key) is not None}


@dataclass
class TrainingRecord(RunRecord):
    """The record of :class:`~splitunet.flare.controller.SplitLearningController` (fields are ``results.json`` keys).

    Attributes:
        resumed_from: ``{"iteration", "checkpoint"}`` of the checkpoint a resumed run started from.
        val_cases: the held-out cases' keys.
        sites: site -> modality, in decoder order.
        num_train_cases, num_val_cases: how many cases train and validate.
        model: the model settings (``SplitModelConfig.to_dict()``).
        optimizer: every party's optimiser (:data:`~splitunet.networks.optimizer.OPTIMIZER_NAME`), so that a study
            reuses a finished run only if the same optimiser trained it.
        crop_size, batch_size: the training crops.
        server_compute: the decoder's device, whether AMP was asked for and applies, and the bits of the codes the
            gradients leave the device as (``None``: dense).
        cohorts: with several sites per modality, per cohort its sites by modality, its numbers of training and
            held-out cases and the steps it trained (:meth:`~splitunet.server.cohorts.Cohort.describe`); counts only,
            never a case key.
        encoder_averaging: with several sites per modality, the averaging of their encoders: settings, weights,
            rounds (:meth:`~splitunet.flare.encoder_averaging.EncoderAveraging.describe`).
        history: per validation, ``{"iteration", "loss", "dice", "hd95"}``.
        loss_curve: the loss of every training step.
        checkpoints: ``{"server": {tag: path}, "sites": {site: {tag: path}}}`` of the last save of each tag.
        dice: the last validation's Dice per region and mean.
        hd95: the last validation's HD95 per region and mean, in voxels (:mod:`splitunet.region_scores`).
        best: ``{"iteration", "dice"}`` of the best validation so far.
        dice_without: at the end of a mean-fusion run, the Dice with each modality left out in turn.
        predictions: case key -> NIfTI file of the final segmentations of the first held-out cases.
        activation_bytes_per_iteration, timing_per_iteration_s, task_dispatch_per_iteration_s: means over the
            timed steps, written when the training loop ends (:meth:`summarise_steps`).
        timing: the sums behind those means.
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "status",
        "iterations",
        "resumed_from",
        "left_out_cases",
        "val_cases",
        "sites",
        "num_train_cases",
        "num_val_cases",
        "model",
        "optimizer",
        "crop_size",
        "batch_size",
        "server_compute",
        "cohorts",
        "encoder_averaging",
        "history",
        "loss_curve",
        "dropped_sites",
        "checkpoints",
        "filters",
        "dice",
        "hd95",
        "best",
        "dice_without",
        "predictions",
        "activation_bytes_per_iteration",
        "timing_per_iteration_s",
        "task_dispatch_per_iteration_s",
        "error",
    )

    resumed_from: dict | None = None
    val_cases: list[str] | None = None
    sites: dict[str, str] | None = None
    num_train_cases: int | None = None
    num_val_cases: int | None = None
    model: dict | None = None
    optimizer: str | None = None
    crop_size: list[int] | None = None
    batch_size: int | None = None
    server_compute: dict | None = None
    cohorts: list[dict] | None = None
    encoder_averaging: dict | None = None
    history: list[dict] | None = None
    loss_curve: list[float] | None = None
    checkpoints: dict | None = None
    dice: dict[str, float] | None = None
    hd95: dict[str, float] | None = None
    best: dict | None = None
    dice_without: dict[str, dict] | None = None
    predictions: dict[str, str] | None = None
    activation_bytes_per_iteration: float | None = None
    timing_per_iteration_s: dict[str, float] | None = None
    task_dispatch_per_iteration_s: dict[str, float] | None = None
    timing: StepTiming = field(default_factory=StepTiming)

    def start(self, **setup) -> None:
        """Training starts: record its setup (``sites``, case counts, model, crops, ``server_compute``)."""
        for name, value in setup.items():
            setattr(self, name, value)
        self.history, self.loss_curve, self.dropped_sites = [], [], []
        self.checkpoints = {"server": {}, "sites": {}}

    def add_step(
        self, loss: float, site_s: float, server_s: float, round_trip_s: float, activation_bytes: int, dispatched
    ) -> tuple[float, float, float]:
        """Record one training step; returns its timing split (see :meth:`StepTiming.add`)."""
        self.loss_curve.append(loss)
        return self.timing.add(site_s, server_s, round_trip_s, activation_bytes, dispatched)

    def add_validation(
        self, iteration: int, loss: float, dice: dict[str, float], hd95: dict[str, float] | None = None
    ) -> bool:
        """Record a validation; returns whether it is the best so far (by mean Dice)."""
        entry = {"iteration": iteration, "loss": loss, "dice": dice}
        if hd95 is not None:
            entry["hd95"] = hd95
        self.history.append(entry)
        self.dice, self.hd95 = dice, hd95
        is_best = dice["mean"] > (self.best or {}).get("dice", {}).get("mean", -1.0)
        if is_best:
            self.best = {"iteration": iteration, "dice": dice}
        return is_best

    def add_checkpoint(self, tag: str, path: str, site: str | None = None) -> None:
        """Record where a party saved its ``tag`` checkpoint (``site=None``: the server)."""
        if site is None:
            self.checkpoints["server"][tag] = path
        else:
            self.checkpoints["sites"].setdefault(site, {})[tag] = path

    def summarise_steps(self) -> None:
        """The training loop ended: write the per-step means."""
        steps = max(self.timing.steps, 1)
        self.activation_bytes_per_iteration = self.timing.activation_bytes / steps
        self.timing_per_iteration_s = self.timing.mean()
        # Part of waiting/transfer: the spread with which FLARE hands the step's tasks to the sites.
        if self.timing.dispatch:
            count = len(self.timing.dispatch)
            self.task_dispatch_per_iteration_s = {
                "first_site": sum(first for first, _ in self.timing.dispatch) / count,
                "last_site": sum(last for _, last in self.timing.dispatch) / count,
            }

    def resumable(self) -> dict:
        """What a checkpoint keeps of this record (see :data:`RESUMED_KEYS`)."""
        return {key: getattr(self, key) for key in RESUMED_KEYS if getattr(self, key) is not None}

    def restore(self, saved: Mapping, iteration: int) -> None:
        """Take up :meth:`resumable` output of a checkpoint written at ``iteration``."""
        for key in RESUMED_KEYS:
            if key in saved:
                setattr(self, key, saved[key])
        self.iterations = iteration


@dataclass
class InferenceRecord(RunRecord):
    """The record of :class:`~splitunet.flare.inference_controller.SplitInferenceController`.

    Attributes:
        model: the checkpoint file, its iteration and its model settings.
        layout: the label layout of the written segmentations.
        roi_size: the sliding-window size.
        absent_modalities: trained modalities no site holds in this run.
        predictions: case key -> ``{"file", "voxels": {region: count}}``.
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "status",
        "iterations",
        "model",
        "layout",
        "roi_size",
        "left_out_cases",
        "absent_modalities",
        "filters",
        "predictions",
        "dropped_sites",
        "error",
    )

    model: dict | None = None
    layout: str | None = None
    roi_size: list[int] | None = None
    absent_modalities: list[str] | None = None
    predictions: dict[str, dict] | None = None
