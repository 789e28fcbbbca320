"""The arguments of the server workflows, checked once, when FLARE builds the workflow from the job config.

A malformed job configuration fails before any site is contacted, naming the argument. The workflows
(:mod:`splitunet.flare.controller`, :mod:`splitunet.flare.inference_controller`) take the same argument names and
defaults as these settings and only build them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from splitunet.errors import SplitUNetConfigError
from splitunet.federated.drift_correction import DriftCorrection
from splitunet.resume import CHECKPOINT_TAGS
from splitunet.server.cohorts import COHORT_DRAWS
from splitunet.server.trainer import LOSSES
from splitunet.wire.model_config import SplitModelConfig, check_crop_size

__all__ = [
    "TaskSettings",
    "TrainingSettings",
    "InferenceSettings",
    "SITE_FAILURE_POLICIES",
    "EXPERIMENT_NAME",
    "MAX_LONG_POLL_S",
    "MODEL_DEFAULTS",
    "PIPELINE_DELAYS",
]

# What a run does when a site stops answering or fails a task after setup.
SITE_FAILURE_POLICIES = ("stop", "continue")
# A checkpoint folder name: no path separators, no leading dot.
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A held task request occupies a server thread and must end well before the site's own request timeout.
MAX_LONG_POLL_S = 5.0
# Steps a site's gradients may arrive late (docs/design.md, "Pipelined steps"): with two stages, sites and server, one
# step ahead already overlaps them completely, so a deeper pipeline would only make the gradients staler.
PIPELINE_DELAYS = (0, 1)
# The model settings a training run starts from when the job does not say: SplitModelConfig's own defaults.
MODEL_DEFAULTS = SplitModelConfig()


def _check_int(name: str, value, minimum: int) -> int:
    # bool is an int to Python, never a count in a job config.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SplitUNetConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_overlap(sw_overlap) -> float:
    if not isinstance(sw_overlap, (int, float)) or not 0 <= sw_overlap < 1:
        raise SplitUNetConfigError(f"sw_overlap must be in [0, 1), got {sw_overlap}")
    return float(sw_overlap)


def _check_experiment(experiment) -> str:
    if not isinstance(experiment, str) or not EXPERIMENT_NAME.match(experiment):
        raise SplitUNetConfigError(
            "experiment must be a folder name (1-64 letters, digits, '_', '.' or '-', not starting with '.', '_' "
            f"or '-'), got {experiment!r}"
        )
    return experiment


def _check_sites(sites) -> list[str] | None:
    if not sites:
        return None
    if isinstance(sites, str) or not all(isinstance(site, str) and site for site in sites):
        raise SplitUNetConfigError(f"sites must be a list of site names, got {sites!r}")
    return list(sites)


def _check_drift_correction(settings) -> dict | None:
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        raise SplitUNetConfigError(f"drift_correction must be null or an object of arguments, got {settings!r}")
    try:
        DriftCorrection(**dict(settings))
    except (TypeError, ValueError) as error:
        raise SplitUNetConfigError(f"drift_correction {dict(settings)}: {error}") from error
    return dict(settings)


def _check_fedprox_mu(mu) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        raise SplitUNetConfigError(f"fedprox_mu must be a finite number >= 0 (0: no proximal term), got {mu!r}")
    return float(mu)


@dataclass
class TaskSettings:
    """How the server talks to the sites; shared by every workflow.

    Args:
        task_timeout: seconds a site may take to answer one task before it counts as gone.
        setup_timeout: seconds the sites may take to answer the setup task (they may still be starting, and
            they read every case once).
        on_site_failure: ``"stop"`` or ``"continue"`` (drop the site and go on, where the workflow can).
        task_check_period: how often FLARE checks task status (its 0.2 s default adds latency to every step).
        num_threads: torch CPU threads at the server (0: default or ``$SPLITUNET_TORCH_THREADS``).
        task_long_poll_s: seconds a site's request for work may wait at the server for its next task (0: FLARE's
            polling only); see :class:`~splitunet.flare.task_long_poll.TaskLongPoll`.

    Raises:
        SplitUNetConfigError: an argument is malformed (the message names it).
    """

    task_timeout: int = 600
    setup_timeout: int = 600
    on_site_failure: str = "stop"
    task_check_period: float = 0.005
    num_threads: int = 0
    task_long_poll_s: float = 0.0

    def __post_init__(self):
        long_poll = self.task_long_poll_s
        if (
            not isinstance(long_poll, (int, float))
            or isinstance(long_poll, bool)
            or not 0 <= long_poll <= MAX_LONG_POLL_S
        ):
            raise SplitUNetConfigError(
                f"task_long_poll_s must be a number of seconds in [0, {MAX_LONG_POLL_S}], got {long_poll!r}"
            )
        self.task_long_poll_s = float(long_poll)
        _check_int("task_timeout", self.task_timeout, 1)
        _check_int("setup_timeout", self.setup_timeout, 1)
        if self.on_site_failure not in SITE_FAILURE_POLICIES:
            raise SplitUNetConfigError(
                f"on_site_failure must be one of {SITE_FAILURE_POLICIES}, got {self.on_site_failure!r}"
            )
        if not isinstance(self.task_check_period, (int, float)) or not self.task_check_period > 0:
            raise SplitUNetConfigError(
                f"task_check_period must be a number of seconds > 0, got {self.task_check_period!r}"
            )
        self.task_check_period = float(self.task_check_period)
        _check_int("num_threads", self.num_threads, 0)


@dataclass
class TrainingSettings(TaskSettings):
    """Every argument of :class:`~splitunet.flare.controller.SplitLearningController`, checked.

    Args:
        num_iterations: training iterations.
        batch_size: crops per iteration.
        crop_size: training crop ``(D, H, W)``; also the sliding-window size at validation.
        features: BasicUNet feature sizes (5 or 6 ints).
        skip_levels: skip levels x0..x3 that sites send (x4 is always sent).
        fusion: ``"concat"`` or ``"mean"``.
        loss: ``"dice_ce"`` or ``"dice_focal"``.
        learning_rate: Adam learning rate at every party.
        weight_decay: AdamW's decoupled weight decay (:mod:`splitunet.networks.optimizer` says why not Adam's).
        transfer_dtype: ``"float32"`` or ``"float16"`` on the wire.
        train_encoders: ``False``: send the sites no gradients; their encoders stay at their private
            initialisation (:class:`~splitunet.wire.model_config.SplitModelConfig`).
        val_every: validate every this many iterations (and after the last).
        num_val_cases: held-out cases (chosen by seed among the cases every party has).
        sw_batch_size: windows per round trip at validation.
        sw_overlap: sliding-window overlap.
        num_preview_cases: held-out cases whose final segmentation is written as NIfTI at the server.
        sites: site names to use; default every connected client.
        seed: seed of the case split, crop sampling and initialisation.
        modality_dropout: probability that a site sits out a training step (at least one site always takes
            part); needs ``fusion="mean"``. Trains the decoder to predict when a modality is absent.
        cohort_draw: with several sites per modality, how each step picks the one cohort (the sites holding a set
            of cases together) it trains on: ``"proportional"`` to the cohorts' training cases, or ``"round_robin"``
            (:class:`~splitunet.server.cohorts.CohortPlanner`). No effect with one site per modality.
        encoder_averaging_every: with several sites per modality, average the encoders of each modality's sites,
            weighted by their training cases, after every this many iterations (0: never). No effect with one site
            per modality or frozen encoders.
        drift_correction: ``None`` (plain weighted averaging) or the arguments of
            :class:`~splitunet.federated.drift_correction.DriftCorrection` (``{}``: its defaults), DWCS applied to
            each modality's averaged encoder.
        fedprox_mu: with several sites per modality, FedProx's ``mu`` (>= 0; 0: off): each averaged site adds the
            gradient of ``(mu/2) ||w - w_avg||^2`` towards the last average it took to its encoder's gradients
            (:class:`~splitunet.site.trainer.SiteTrainer`); sent with every average. No effect where nothing is
            averaged.
        checkpoint_every: also save the ``last`` checkpoints every this many iterations (0: only when
            validating).
        pipeline_delay: ``0``: lock-step, each step's task goes out after the server's step before it. ``1``: the
            task of step ``t+1`` goes out before the server's step ``t``, so the sites encode while the server
            decodes, and each site's gradients arrive one step later (docs/design.md, "Pipelined steps"). The
            pipeline is emptied before every validation, checkpoint and encoder averaging, so those (and a resume)
            see the state lock-step leaves. Not with DP-SGD at the sites (they refuse it).
        experiment: name of the checkpoint folder at parties whose settings name a ``checkpoint_dir``.
        resume: continue from every party's ``last`` checkpoint of ``experiment``: model and optimiser states,
            iteration, crop sampler and history. With the same settings the run ends with the same weights as
            one never interrupted.
        device: ``"auto"`` or a torch device for the decoder.
        amp: train the decoder under bfloat16 autocast (for GPUs; see :mod:`splitunet.compute.mixed_precision`).
            Each site chooses its own in its executor's ``amp``; the wire precision does not change.
        log_every: iterations between log lines with the timing split.
        analytics: stream metrics as FLARE analytics events (a ``TBAnalyticsReceiver`` in the job writes them
            to TensorBoard).
        task_timeout, setup_timeout, task_check_period, num_threads, task_long_poll_s: as :class:`TaskSettings`.
        on_site_failure: ``"stop"``: a site that fails a task or stays silent for ``task_timeout`` stops the
            run, naming the site and iteration; every party keeps its last checkpoint. ``"continue"`` (needs
            ``fusion="mean"``): train and validate on without that modality and log it (``results.json``:
            ``dropped_sites``).

    Attributes:
        model: the :class:`~splitunet.wire.model_config.SplitModelConfig` built from the model arguments.

    Raises:
        SplitUNetConfigError: an argument is malformed or two of them contradict each other.
    """

    num_iterations: int = 200
    batch_size: int = 2
    crop_size: Sequence[int] = (48, 48, 48)
    features: Sequence[int] = MODEL_DEFAULTS.features
    skip_levels: Sequence[int] = MODEL_DEFAULTS.skip_levels
    fusion: str = MODEL_DEFAULTS.fusion
    loss: str = "dice_ce"
    learning_rate: float = MODEL_DEFAULTS.learning_rate
    weight_decay: float = MODEL_DEFAULTS.weight_decay
    transfer_dtype: str = MODEL_DEFAULTS.transfer_dtype
    train_encoders: bool = MODEL_DEFAULTS.train_encoders
    val_every: int = 100
    num_val_cases: int = 4
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    num_preview_cases: int = 1
    sites: Sequence[str] | None = None
    seed: int = MODEL_DEFAULTS.seed
    modality_dropout: float = 0.0
    cohort_draw: str = "proportional"
    encoder_averaging_every: int = 10
    drift_correction: Mapping | None = None
    fedprox_mu: float = 0.0
    checkpoint_every: int = 0
    pipeline_delay: int = 0
    experiment: str = "split_unet"
    resume: bool = False
    device: str = "auto"
    amp: bool = False
    log_every: int = 10
    analytics: bool = True
    model: SplitModelConfig = field(init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        self.seed = _check_int("seed", self.seed, 0)
        self.model = SplitModelConfig(
            features=tuple(self.features),
            skip_levels=tuple(self.skip_levels),
            fusion=self.fusion,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
            transfer_dtype=self.transfer_dtype,
            train_encoders=self.train_encoders,
        )
        for name in ("num_iterations", "batch_size", "val_every", "num_val_cases", "sw_batch_size", "log_every"):
            _check_int(name, getattr(self, name), 1)
        self.crop_size = check_crop_size(self.crop_size)
        if self.loss not in LOSSES:
            raise SplitUNetConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        self.sw_overlap = _check_overlap(self.sw_overlap)
        if not isinstance(self.modality_dropout, (int, float)) or not 0.0 <= self.modality_dropout < 1.0:
            raise SplitUNetConfigError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        self.modality_dropout = float(self.modality_dropout)
        if self.fusion != "mean" and (self.on_site_failure == "continue" or self.modality_dropout > 0):
            raise SplitUNetConfigError(
                "on_site_failure='continue' and modality_dropout > 0 need fusion='mean' (a concatenating decoder "
                f"cannot run with a modality absent); got fusion={self.fusion!r}"
            )
        for name in ("amp", "resume", "analytics"):
            if not isinstance(getattr(self, name), bool):
                raise SplitUNetConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        delay = self.pipeline_delay
        if not isinstance(delay, int) or isinstance(delay, bool) or delay not in PIPELINE_DELAYS:
            raise SplitUNetConfigError(
                f"pipeline_delay must be one of {PIPELINE_DELAYS} (steps a site's gradients arrive late; one step "
                f"already overlaps sites and server), got {self.pipeline_delay!r}"
            )
        _check_int("num_preview_cases", self.num_preview_cases, 0)
        _check_int("encoder_averaging_every", self.encoder_averaging_every, 0)
        if self.cohort_draw not in COHORT_DRAWS:
            raise SplitUNetConfigError(f"cohort_draw must be one of {COHORT_DRAWS}, got {self.cohort_draw!r}")
        self.drift_correction = _check_drift_correction(self.drift_correction)
        self.fedprox_mu = _check_fedprox_mu(self.fedprox_mu)
        _check_experiment(self.experiment)
        self.sites = _check_sites(self.sites)


@dataclass
class InferenceSettings(TaskSettings):
    """Every argument of :class:`~splitunet.flare.inference_controller.SplitInferenceController`, checked.

    Args:
        experiment: the training run's checkpoint folder name.
        checkpoint: ``"best"`` or ``"last"``.
        roi_size: sliding-window size (default: the training crop size).
        sw_batch_size: windows per round trip.
        sw_overlap: window overlap.
        sites: site names to use; default every connected client.
        device: ``"auto"`` or a torch device for the decoder.
        task_timeout, setup_timeout, task_check_period, num_threads, task_long_poll_s: as :class:`TaskSettings`.
        on_site_failure: always ``"stop"``: a case is segmented with every site or not at all.

    Raises:
        SplitUNetConfigError: an argument is malformed (the message names it).
    """

    experiment: str = "split_unet"
    checkpoint: str = "best"
    roi_size: Sequence[int] | None = None
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    sites: Sequence[str] | None = None
    device: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.on_site_failure != "stop":
            raise SplitUNetConfigError(f"inference stops when a site fails; on_site_failure {self.on_site_failure!r}")
        _check_experiment(self.experiment)
        if self.checkpoint not in CHECKPOINT_TAGS:
            raise SplitUNetConfigError(f"checkpoint must be one of {CHECKPOINT_TAGS}, got {self.checkpoint!r}")
        if self.roi_size is not None:
            self.roi_size = check_crop_size(self.roi_size, "roi_size")
        _check_int("sw_batch_size", self.sw_batch_size, 1)
        self.sw_overlap = _check_overlap(self.sw_overlap)
        self.sites = _check_sites(self.sites)
