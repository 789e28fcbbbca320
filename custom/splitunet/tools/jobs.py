"""The bundle's FLARE job folders, described once and generated: ``splitunet jobs`` writes ``jobs/<name>/``.

Every shipped job is an entry of :data:`JOBS`. Four are written out in full (:class:`Job`): the main training job
``split_unet`` (int8 codes on the wire both ways, then the guard), the inference job ``split_unet_infer``, the
horizontal FedAvg baseline ``fedavg_unet`` (FLARE's own workflows, no filters) and the three-part U-shape
``u_shape_unet``. Every other one is a :class:`Variant`: the job it starts from and what it changes. The float32
reference ``split_unet_fp32`` is the main job without quantizers, each defense job is that reference plus one defense
(filters, or for NoPeek a setting of the sites' executor, and the workflow settings the defense forces), and
``split_unet_missing_modality`` and ``split_unet_splitfed`` (two sites per modality) change workflow settings and
``min_clients`` only. Adding a job is adding one entry.

The generated folders are checked in under ``jobs/`` as ordinary FLARE job folders (``meta.json`` and
``app/config/config_fed_{client,server}.json``), so ``nvflare simulator jobs/<name>`` and ``nvflare job submit`` read
them as before; ``splitunet jobs --check`` (and a test) fail when they drift from this description.

Importing this module loads neither nvflare nor torch (the standard library and two small splitunet modules only),
so that reading the description, e.g. the defense table's job names, works where they are not installed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from splitunet.atomic_files import write_json_atomic
from splitunet.errors import SplitUNetConfigError
from splitunet.wire.protocol import MODALITIES

__all__ = [
    "Filter",
    "Workflow",
    "Job",
    "Variant",
    "JOBS",
    "CONFIG_FILES",
    "resolve_jobs",
    "defense_jobs",
    "job_files",
    "generate_jobs",
    "write_jobs",
    "check_jobs",
]

FILTERS_MODULE = "splitunet.filters"
# The files of one job folder, relative to it; every app is deployed to every party.
CONFIG_FILES = ("meta.json", "app/config/config_fed_client.json", "app/config/config_fed_server.json")


@dataclass(frozen=True)
class Filter:
    """One FLARE filter of ``splitunet.filters``.

    Args:
        class_name: the class in ``splitunet.filters`` (``"QuantizeFeatures"``).
        args: its constructor arguments, as written in the config.
        also_tasks: tasks its chain must filter besides the job's filtered ones (a level-blocking filter marks the
            setup reply too, so that a decoder still expecting the blocked level stops at setup).
    """

    class_name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    also_tasks: tuple[str, ...] = ()

    def config(self) -> dict:
        """The filter's entry in a filter chain."""
        return {"path": f"{FILTERS_MODULE}.{self.class_name}", "args": copy.deepcopy(dict(self.args))}


@dataclass(frozen=True)
class Workflow:
    """The server's one workflow (controller).

    Args:
        id: its component id.
        path: the controller class, fully qualified.
        args: its constructor arguments, in the order written.
    """

    id: str
    path: str
    args: Mapping[str, Any]


@dataclass(frozen=True)
class Job:
    """Everything one job folder says.

    Args:
        name: the folder name, also ``meta.json``'s name.
        workflow: the server's workflow.
        executor_tasks: the tasks the sites' executor takes.
        executor_args: the sites' :class:`~splitunet.flare.SplitSiteExecutor` arguments.
        filtered_tasks: the tasks whose payloads go through the filter chains (both sides, both directions).
        site_filters: what the sites apply to what they send (activations), before the guard.
        server_filters: what the server applies to what it sends (gradients), before the guard.
        components: the server's extra components, ``(id, path, args)`` each.
        client_components: the sites' extra components, ``(id, path, args)`` each.
        min_clients: ``meta.json``'s ``min_clients``.
        defense: whether the job is a row of the defense table (``splitunet defenses``).
        executor_path: the sites' executor class, fully qualified (default: the split-learning site executor).
        executor_id: its component id.
        extra_workflows: the server's workflows that run after ``workflow``, in order.

    A job without ``filtered_tasks`` has no filter chains (the guard checks split-learning payloads only).
    """

    name: str
    workflow: Workflow
    executor_tasks: tuple[str, ...]
    executor_args: Mapping[str, Any]
    filtered_tasks: tuple[str, ...]
    site_filters: tuple[Filter, ...]
    server_filters: tuple[Filter, ...]
    components: tuple[tuple[str, str, Mapping[str, Any]], ...] = ()
    client_components: tuple[tuple[str, str, Mapping[str, Any]], ...] = ()
    min_clients: int = 2
    defense: bool = False
    executor_path: str = "splitunet.flare.SplitSiteExecutor"
    executor_id: str = "split_site"
    extra_workflows: tuple[Workflow, ...] = ()


@dataclass(frozen=True)
class Variant:
    """A job described by the job it starts from and what it changes.

    Args:
        name: the folder name.
        base: the name of the entry it starts from (any entry of the description, in any order).
        site_filters: replace the base's sites' filters (``None``: keep them; ``()``: none).
        server_filters: replace the base's server's filters (``None``: keep them; ``()``: none).
        workflow_args: workflow arguments set over the base's (new ones go last).
        executor_args: the sites' executor arguments set over the base's (new ones go last).
        min_clients: replace the base's ``min_clients`` (``None``: keep it).
        defense: whether the job is a row of the defense table; not inherited from the base.
    """

    name: str
    base: str
    site_filters: tuple[Filter, ...] | None = None
    server_filters: tuple[Filter, ...] | None = None
    workflow_args: Mapping[str, Any] = field(default_factory=dict)
    executor_args: Mapping[str, Any] = field(default_factory=dict)
    min_clients: int | None = None
    defense: bool = False


Entry = Job | Variant

# What a site sends and the server sends back, checked last on both sides whatever the job.
GUARD = Filter("FeatureGuard", {"log_every": 50})
INT8 = Filter("QuantizeFeatures", {"precision": "int8"})

TRAINING_TASKS = ("split_setup", "split_step", "split_encode", "split_save", "split_average")
# Filters see the per-iteration payloads (activations out, gradients back; the averaging of encoders that share a
# modality carries gradients down and weights up, which the feature filters pass on); setup and save carry none.
TRAINING_FILTERED_TASKS = ("split_step", "split_encode", "split_average")
TB_RECEIVER = ("tb_receiver", "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver", {"tb_folder": "tb_events"})
# A site's analytics (the epsilon its DP-SGD has spent) forwarded to the server's TensorBoard receiver.
TO_SERVER_EVENTS = (
    "event_to_fed",
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
    {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."},
)

MAIN_JOB = Job(
    name="split_unet",
    workflow=Workflow(
        "split_learning",
        "splitunet.flare.SplitLearningController",
        {
            "num_iterations": 200,
            "batch_size": 2,
            "crop_size": [48, 48, 48],
            "features": [8, 16, 32, 64, 128, 8],
            "skip_levels": [0, 1, 2, 3],
            "fusion": "concat",
            "loss": "dice_ce",
            "learning_rate": 0.002,
            "transfer_dtype": "float32",
            "val_every": 100,
            "num_val_cases": 4,
            "sw_batch_size": 4,
            "seed": 0,
            "task_timeout": 600,
            "device": "auto",
            "amp": False,
            "analytics": True,
            "task_long_poll_s": 2.0,
        },
    ),
    executor_tasks=TRAINING_TASKS,
    executor_args={"device": "auto", "amp": False},
    filtered_tasks=TRAINING_FILTERED_TASKS,
    # int8 codes on every level, both ways: a quarter of float32's bytes.
    site_filters=(INT8,),
    server_filters=(INT8,),
    components=(TB_RECEIVER,),
    # A concat decoder has one input per modality: FLARE starts the job only when every modality's site is
    # connected, instead of training a smaller decoder on whoever is up.
    min_clients=len(MODALITIES),
    defense=True,
)

INFERENCE_JOB = Job(
    name="split_unet_infer",
    workflow=Workflow(
        "split_inference",
        "splitunet.flare.SplitInferenceController",
        {
            "experiment": "split_unet",
            "checkpoint": "best",
            "sw_batch_size": 4,
            "sw_overlap": 0.25,
            "task_timeout": 600,
            "device": "auto",
            "task_long_poll_s": 2.0,
        },
    ),
    executor_tasks=("split_setup", "split_encode"),
    # The training executor; "amp" is left out because it acts on training passes only.
    executor_args={"device": "auto"},
    filtered_tasks=("split_encode",),
    # The wire of the model it runs: the main job's.
    site_filters=MAIN_JOB.site_filters,
    server_filters=MAIN_JOB.server_filters,
    # One site suffices to start; the controller checks that the model can take the modalities present.
    min_clients=1,
)

# The horizontal baseline (splitunet.horizontal): hospitals that each hold every modality and the labels of their own
# patients train the main job's U-Net with FLARE's FedAvg and PyTorch persistor; FLARE's GlobalModelEval then scores
# the final global model at every hospital. What decides what is learned is taken from the main job.
_SPLIT_ARGS = MAIN_JOB.workflow.args
FEDAVG_LOCAL_ITERATIONS = 10
FEDAVG_JOB = Job(
    name="fedavg_unet",
    workflow=Workflow(
        "fedavg",
        "nvflare.app_common.workflows.fedavg.FedAvg",
        {
            # Every hospital's model takes the main job's number of Adam steps.
            "num_rounds": _SPLIT_ARGS["num_iterations"] // FEDAVG_LOCAL_ITERATIONS,
            # Every connected hospital in every round (a number would sample that many at random).
            "num_clients": None,
            "persistor_id": "persistor",
            # FedProx when > 0: FedAvg hands the coefficient to the hospitals with the model.
            "fedprox_mu": 0.0,
            "task_check_period": 0.1,
        },
    ),
    extra_workflows=(
        Workflow(
            "global_model_eval",
            "nvflare.app_common.workflows.global_model_eval.GlobalModelEval",
            {"model_locator_id": "model_locator", "validation_timeout": 6000},
        ),
    ),
    executor_tasks=("train", "validate"),
    executor_args={
        "local_iterations": FEDAVG_LOCAL_ITERATIONS,
        # The global model is scored where the main job validates (and the final one by GlobalModelEval).
        "val_every": _SPLIT_ARGS["val_every"] // FEDAVG_LOCAL_ITERATIONS,
        **{
            name: _SPLIT_ARGS[name]
            for name in (
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
                "device",
            )
        },
    },
    filtered_tasks=(),
    site_filters=(),
    server_filters=(),
    components=(
        ("persistor", "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor", {"model": "model"}),
        (
            "model",
            "splitunet.horizontal.FedAvgUNet",
            {k: _SPLIT_ARGS[k] for k in ("features", "skip_levels", "fusion", "seed")},
        ),
        ("model_locator", "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator", {"pt_persistor_id": "persistor"}),
        ("json_generator", "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator", {}),
    ),
    min_clients=2,
    executor_path="splitunet.horizontal.FedAvgHospitalExecutor",
    executor_id="hospital",
)

# The FedAvg baseline with DP-SGD at every hospital (splitunet.dp, docs/dp.md); only the hospitals' "dp" argument
# differs. Each hospital's sigma is chosen for the job's steps so that its epsilon ends at or below target_epsilon (at
# delta min(1e-5, 1/(10 N))); C is about a case's gradient norm at the start of training (0.21-0.25 on the phantom).
FEDAVG_DP_JOB = replace(
    FEDAVG_JOB,
    name="fedavg_unet_dp",
    executor_args={
        **FEDAVG_JOB.executor_args,
        "dp": {"target_epsilon": 8.0, "max_grad_norm": 0.25, "accountant": "rdp", "poisson_sampling": True},
    },
    # Each hospital's epsilon after every round, in the server's TensorBoard.
    components=(*FEDAVG_JOB.components, TB_RECEIVER),
    client_components=(TO_SERVER_EVENTS,),
)

# The FedAvg baseline with DWCS on every round's global model (splitunet.horizontal.DriftCorrectedFedAvg, FLARE's
# FedAvg otherwise; docs/topologies.md): only the workflow's class and its drift_correction ({}: DWCS's defaults).
FEDAVG_DWCS_JOB = replace(
    FEDAVG_JOB,
    name="fedavg_unet_dwcs",
    workflow=replace(
        FEDAVG_JOB.workflow,
        path="splitunet.horizontal.DriftCorrectedFedAvg",
        args={**FEDAVG_JOB.workflow.args, "drift_correction": {}},
    ),
)

# The U-shaped three-part split (splitunet.u_shape; Yang et al., RoS-FL): hospitals that each hold every modality
# and their patients' labels keep the first encoder block, the last decoder block, the head and the loss; the
# server runs one shared middle. Heads and tails are averaged by case count after every round (DWCS when
# drift_correction names its arguments). The main job's model, optimiser and wire (int8 both ways), and as many
# iterations, validated as often; x0, u2 and both gradients travel in the filters' feature DXOs.
U_SHAPE_JOB = Job(
    name="u_shape_unet",
    workflow=Workflow(
        "u_shape",
        "splitunet.u_shape.UShapeController",
        {
            "num_rounds": MAIN_JOB.workflow.args["num_iterations"] // 20,
            "iterations_per_round": 20,
            "val_every": MAIN_JOB.workflow.args["val_every"] // 20,
            "num_val_cases": 1,
            "drift_correction": None,
            **{
                name: MAIN_JOB.workflow.args[name]
                for name in (
                    "batch_size",
                    "crop_size",
                    "features",
                    "loss",
                    "learning_rate",
                    "sw_batch_size",
                    "seed",
                    "device",
                    "task_timeout",
                    "task_long_poll_s",
                )
            },
        },
    ),
    executor_tasks=("u_setup", "u_forward", "u_tail", "u_collect", "u_validate"),
    executor_args={"device": "auto"},
    # Every task after setup carries tensors or weights: x0 and dL/du2 up, u2 and dL/dx0 down, heads and tails
    # up for averaging and the average down (the feature filters pass FLARE's WEIGHTS DXOs on unchanged).
    filtered_tasks=("u_forward", "u_tail", "u_collect", "u_validate"),
    site_filters=(INT8,),
    server_filters=(INT8,),
    min_clients=2,
    executor_path="splitunet.u_shape.UShapeHospitalExecutor",
    executor_id="u_shape_hospital",
)

# DP-SGD at the split parties (splitunet.dp, docs/dp.md): each site's encoder (the main job) and each hospital's head
# and tail (the U-shape) train with Opacus through the gradients the server returns; only the parties' "dp" and
# "dp_steps" arguments differ. The server chooses the batches, so there is no sampling to amplify by
# (poisson_sampling false, sample rate 1); sigma is chosen for the job's steps so that each party's epsilon ends at or
# below target_epsilon (at delta min(1e-5, 1/(10 N))). C is about a case's gradient norm at the start of training on
# the phantom at the jobs' sizes: 0.05-0.32 for an encoder (by modality), 0.20-0.41 for a head and tail.
SPLIT_DP = {"target_epsilon": 8.0, "accountant": "rdp", "poisson_sampling": False}
SPLIT_DP_JOB = replace(
    MAIN_JOB,
    name="split_unet_dp",
    executor_args={
        **MAIN_JOB.executor_args,
        "dp": {**SPLIT_DP, "max_grad_norm": 0.1},
        # A site takes at most one step per iteration.
        "dp_steps": MAIN_JOB.workflow.args["num_iterations"],
    },
    client_components=(TO_SERVER_EVENTS,),
    defense=False,
)
U_SHAPE_DP_JOB = replace(
    U_SHAPE_JOB,
    name="u_shape_unet_dp",
    executor_args={
        **U_SHAPE_JOB.executor_args,
        "dp": {**SPLIT_DP, "max_grad_norm": 0.25},
        "dp_steps": U_SHAPE_JOB.workflow.args["num_rounds"] * U_SHAPE_JOB.workflow.args["iterations_per_round"],
    },
    components=(*U_SHAPE_JOB.components, TB_RECEIVER),
    client_components=(TO_SERVER_EVENTS,),
)

FP32 = "split_unet_fp32"

# The description. Defense rows come in this order, the float32 reference (the baseline of every comparison) first,
# then the precision ladder (float16, the main job's int8, int4), then one defense each on the float32 reference.
JOBS: tuple[Entry, ...] = (
    Variant(FP32, base="split_unet", site_filters=(), server_filters=(), defense=True),
    Variant(
        "split_unet_fp16",
        base=FP32,
        site_filters=(Filter("QuantizeFeatures", {"precision": "float16"}),),
        server_filters=(Filter("QuantizeFeatures", {"precision": "float16"}),),
        defense=True,
    ),
    MAIN_JOB,
    Variant(
        "split_unet_int4", base=FP32, site_filters=(Filter("QuantizeFeatures", {"precision": "int4"}),), defense=True
    ),
    Variant("split_unet_topk", base=FP32, site_filters=(Filter("TopKSparsify", {"fraction": 0.1}),), defense=True),
    Variant(
        "split_unet_dropout",
        base=FP32,
        site_filters=(Filter("ChannelDropout", {"rate": 0.25, "mode": "channel"}),),
        defense=True,
    ),
    Variant(
        "split_unet_noise",
        base=FP32,
        site_filters=(Filter("ClippedGaussianNoise", {"clip_rms": 1.0, "noise_multiplier": 0.0005}),),
        defense=True,
    ),
    Variant(
        "split_unet_no_x0",
        base=FP32,
        site_filters=(Filter("BlockSkipLevels", {"levels": [0]}, also_tasks=("split_setup",)),),
        # The decoder must not wait for the level the sites withhold.
        workflow_args={"skip_levels": [1, 2, 3]},
        defense=True,
    ),
    Variant(
        "split_unet_grad_noise",
        base=FP32,
        # Per-level clip norms at the scale of each level's gradient (the deeper, the smaller).
        server_filters=(
            Filter(
                "ClippedGaussianNoise",
                {
                    "clip_norm": {"x0": 0.0003, "x1": 5e-05, "x2": 1e-05, "x3": 2e-06, "x4": 5e-07},
                    "noise_multiplier": 0.0005,
                },
            ),
        ),
        defense=True,
    ),
    # NoPeek (splitunet.site.nopeek; docs/privacy.md, "NoPeek"): the float32 reference whose sites also train their
    # encoders to decorrelate the features they send from the crops they read. The weight is NoPeekSettings' default
    # (this module loads no torch, so it is written out; a test checks the two agree).
    Variant(
        "split_unet_nopeek",
        base=FP32,
        executor_args={"nopeek": {"weight": 0.1, "positions": 256, "levels": None}},
        defense=True,
    ),
    # The protected preset (docs/privacy.md, "The protected preset"): no gradient leaves the server, so the encoders
    # stay at each site's private random initialisation; x0 never leaves a site; int8 codes on the wire.
    Variant(
        "split_unet_protected",
        base="split_unet",
        site_filters=(Filter("BlockSkipLevels", {"levels": [0]}, also_tasks=("split_setup",)), INT8),
        workflow_args={"skip_levels": [1, 2, 3], "train_encoders": False},
        defense=True,
    ),
    # Trains a decoder that takes any subset of the modalities (mean fusion, modalities dropped in training), and
    # keeps training when a site fails.
    Variant(
        "split_unet_missing_modality",
        base="split_unet",
        workflow_args={"fusion": "mean", "modality_dropout": 0.25, "on_site_failure": "continue"},
        # Mean fusion trains and predicts with a modality absent: two sites suffice to start.
        min_clients=2,
    ),
    # Several sites per modality, each for other patients (SplitFed; docs/topologies.md): two per modality. Each step
    # trains on one cohort of sites; every 10 iterations the encoders of each modality's sites are averaged by
    # training cases (drift_correction names DWCS's arguments to correct the averages; fedprox_mu > 0 has each site
    # add FedProx's proximal gradient towards the last average it took).
    Variant(
        "split_unet_splitfed",
        base="split_unet",
        workflow_args={
            "cohort_draw": "proportional",
            "encoder_averaging_every": 10,
            "drift_correction": None,
            "fedprox_mu": 0.0,
        },
        min_clients=2 * len(MODALITIES),
    ),
    # Pipelined steps (docs/design.md, "Pipelined steps"): the sites encode step t+1 while the server runs step t, and
    # each site's gradients arrive one step later; otherwise the main job.
    Variant("split_unet_pipelined", base="split_unet", workflow_args={"pipeline_delay": 1}),
    SPLIT_DP_JOB,
    INFERENCE_JOB,
    FEDAVG_JOB,
    FEDAVG_DP_JOB,
    FEDAVG_DWCS_JOB,
    U_SHAPE_JOB,
    U_SHAPE_DP_JOB,
)


def resolve_jobs(entries: Sequence[Entry] = JOBS) -> dict[str, Job]:
    """Every entry as a full :class:`Job`, by name, in the entries' order.

    Raises:
        SplitUNetConfigError: two entries share a name, a variant's base is not an entry, bases form a cycle, or a
            job pipelines the steps of sites that train with DP-SGD.
    """
    by_name: dict[str, Entry] = {}
    for entry in entries:
        if entry.name in by_name:
            raise SplitUNetConfigError(f"job {entry.name!r} is described twice")
        by_name[entry.name] = entry
    resolved: dict[str, Job] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Job:
        if name in resolved:
            return resolved[name]
        if name in chain:
            raise SplitUNetConfigError(f"job bases form a cycle: {' -> '.join((*chain, name))}")
        entry = by_name.get(name)
        if entry is None:
            raise SplitUNetConfigError(f"job {chain[-1]!r} names base {name!r}, which is not described")
        if isinstance(entry, Job):
            job = entry
        else:
            base = resolve(entry.base, (*chain, name))
            workflow = replace(base.workflow, args={**base.workflow.args, **entry.workflow_args})
            job = replace(
                base,
                name=entry.name,
                workflow=workflow,
                executor_args={**base.executor_args, **entry.executor_args},
                site_filters=base.site_filters if entry.site_filters is None else entry.site_filters,
                server_filters=base.server_filters if entry.server_filters is None else entry.server_filters,
                min_clients=base.min_clients if entry.min_clients is None else entry.min_clients,
                defense=entry.defense,
            )
        resolved[name] = job
        return job

    for entry in entries:
        _check_combination(resolve(entry.name, ()))
    return {entry.name: resolved[entry.name] for entry in entries}


def _check_combination(job: Job) -> None:
    """Refuse settings that cannot run together (the sites would refuse the job only at its second step)."""
    if job.workflow.args.get("pipeline_delay", 0) and job.executor_args.get("dp") is not None:
        raise SplitUNetConfigError(
            f"job {job.name!r}: DP-SGD at the sites trains lock-step only (Opacus pairs each forward pass with its "
            "backward); set pipeline_delay 0"
        )
    if job.executor_args.get("nopeek") is not None and job.executor_args.get("dp") is not None:
        raise SplitUNetConfigError(f"job {job.name!r}: NoPeek and DP-SGD cannot be combined at a site")


def defense_jobs(entries: Sequence[Entry] = JOBS) -> tuple[str, ...]:
    """The defense table's jobs, in the description's order (the float32 reference first)."""
    return tuple(name for name, job in resolve_jobs(entries).items() if job.defense)


def _chain(tasks: Iterable[str], filters: Sequence[Filter]) -> dict:
    return {"tasks": list(tasks), "filters": [f.config() for f in (*filters, GUARD)]}


def job_files(job: Job) -> dict[str, dict]:
    """The JSON documents of one job folder, by path relative to the folder (:data:`CONFIG_FILES`)."""
    extra_site_tasks = {task for f in job.site_filters for task in f.also_tasks}
    # In the executor's task order, so that the chain reads like the executor's list.
    site_sent_tasks = [t for t in job.executor_tasks if t in job.filtered_tasks or t in extra_site_tasks]
    meta = {"name": job.name, "resource_spec": {}, "deploy_map": {"app": ["@ALL"]}, "min_clients": job.min_clients}
    client = {
        "format_version": 2,
        "default_task_fetch_interval": 0.01,
        "executors": [
            {
                "tasks": list(job.executor_tasks),
                "executor": {
                    "id": job.executor_id,
                    "path": job.executor_path,
                    "args": copy.deepcopy(dict(job.executor_args)),
                },
            }
        ],
        "task_result_filters": [_chain(site_sent_tasks, job.site_filters)] if job.filtered_tasks else [],
        "task_data_filters": [_chain(job.filtered_tasks, ())] if job.filtered_tasks else [],
        "components": [
            {"id": component_id, "path": path, "args": copy.deepcopy(dict(args))}
            for component_id, path, args in job.client_components
        ],
    }
    server = {
        "format_version": 2,
        "server": {"task_request_interval": 0.01},
        "task_data_filters": [_chain(job.filtered_tasks, job.server_filters)] if job.filtered_tasks else [],
        "task_result_filters": [_chain(job.filtered_tasks, ())] if job.filtered_tasks else [],
        "components": [
            {"id": component_id, "path": path, "args": copy.deepcopy(dict(args))}
            for component_id, path, args in job.components
        ],
        "workflows": [
            {"id": workflow.id, "path": workflow.path, "args": copy.deepcopy(dict(workflow.args))}
            for workflow in (job.workflow, *job.extra_workflows)
        ],
    }
    return dict(zip(CONFIG_FILES, (meta, client, server)))


def generate_jobs(entries: Sequence[Entry] = JOBS) -> dict[str, dict]:
    """Every job folder's JSON documents, by path relative to the jobs folder (``split_unet/meta.json``)."""
    return {
        f"{name}/{relative}": document
        for name, job in resolve_jobs(entries).items()
        for relative, document in job_files(job).items()
    }


def _text(document: dict) -> str:
    # The format write_json_atomic writes.
    return json.dumps(document, indent=2) + "\n"


def _default_out() -> Path:
    from splitunet.tools.deployment import bundle_root

    return bundle_root() / "jobs"


def write_jobs(out_dir: str | Path | None = None, entries: Sequence[Entry] = JOBS) -> list[Path]:
    """Write every described job folder under ``out_dir`` (default: the bundle's ``jobs/``), each file atomically.

    Files already as generated are left alone; files the description does not produce are not removed
    (:func:`check_jobs` lists them).

    Returns:
        the files written.
    """
    out_dir = Path(out_dir) if out_dir is not None else _default_out()
    written = []
    for relative, document in generate_jobs(entries).items():
        path = out_dir / relative
        if not path.is_file() or path.read_text() != _text(document):
            written.append(write_json_atomic(document, path))
    return written


def check_jobs(jobs_dir: str | Path | None = None, entries: Sequence[Entry] = JOBS) -> list[str]:
    """What in ``jobs_dir`` (default: the bundle's ``jobs/``) differs from the generated job folders.

    Returns:
        one line per differing file, by path relative to ``jobs_dir``: ``missing``, ``differs`` (byte for byte),
        or ``not generated`` (a file in a described job folder, or a job folder, that the description does not
        produce); empty when the folder holds exactly the generated jobs.
    """
    jobs_dir = Path(jobs_dir) if jobs_dir is not None else _default_out()
    expected = generate_jobs(entries)
    problems = []
    for relative, document in expected.items():
        path = jobs_dir / relative
        if not path.is_file():
            problems.append(f"missing: {relative}")
        elif path.read_text() != _text(document):
            problems.append(f"differs: {relative}")
    described = {relative.split("/", 1)[0] for relative in expected}
    found = [path for path in jobs_dir.glob("*/**/*") if path.is_file()] if jobs_dir.is_dir() else []
    for path in sorted(found):
        relative = path.relative_to(jobs_dir).as_posix()
        folder = relative.split("/", 1)[0]
        # A job folder nobody describes is drift too, whatever it holds.
        if relative not in expected and (folder in described or (jobs_dir / folder / "meta.json").is_file()):
            problems.append(f"not generated: {relative}")
    return problems
