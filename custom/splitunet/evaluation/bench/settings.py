"""What one ``splitunet bench`` run measures: problem sizes, budgets and which paths run, validated up front."""

from __future__ import annotations

import inspect
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitunet.compute.devices import select_device
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.bench.job_defaults import job_training_args, job_wire_precision
from splitunet.evaluation.bench.serialization import flare_available
from splitunet.evaluation.bench.wire import WIRE_PRECISIONS
from splitunet.server.trainer import ServerTrainer
from splitunet.tools.netns_links import parse_rate
from splitunet.wire.model_config import MIN_CROP_SIZE, SplitModelConfig

__all__ = ["ProblemSize", "BenchSettings", "DEVICES", "PRESETS", "STEP_ARM_NAMES"]

DEVICES = ("auto", "cpu", "cuda")
# Presets chosen by name (the others follow from --quick and the device).
PRESETS = ("128",)
# The in-process arms of the step-time table (splitunet.evaluation.bench.step_timing.STEP_ARMS describes them).
STEP_ARM_NAMES = ("centralized", "monolithic_split_unet", "split_in_process")
# The realistic crop of the "128" preset, and the phantom grid it is cut from: the smallest cube that leaves every
# axis 16 voxels of room, so crops still vary (BraTS volumes are 240x240x155; a 160x160x128 grid would pin one axis).
_REAL_CROP = 128
_REAL_VOLUME = (144, 144, 144)
# Features small enough that the quick run's arms take seconds, with the job's five-level shape.
_QUICK_FEATURES = (4, 8, 8, 16, 16, 4)
# Workflow arguments of the job the bench cannot do without.
_JOB_KEYS = ("crop_size", "batch_size", "features", "learning_rate", "num_iterations")


def _validate_default(name: str):
    """A default of the server trainer (validation window batch, overlap; loss), where the job leaves it unset."""
    for function in (ServerTrainer.validate, ServerTrainer.__init__):
        parameter = inspect.signature(function).parameters.get(name)
        if parameter is not None:
            return parameter.default
    raise KeyError(name)


def _add_size(preset: dict, problem: "ProblemSize") -> int:
    """Put ``problem`` among the preset's sizes (kept by increasing crop) unless there; returns its index."""
    sizes = list(preset["sizes"])
    if problem.crop_size not in [s.crop_size for s in sizes]:
        reference = sizes[preset["reference_index"]]
        sizes = sorted([*sizes, problem], key=lambda s: math.prod(s.crop_size))
        preset["sizes"], preset["reference_index"] = tuple(sizes), sizes.index(reference)
    return [s.crop_size for s in preset["sizes"]].index(problem.crop_size)


@dataclass(frozen=True)
class ProblemSize:
    """One training configuration whose cost is measured.

    Attributes:
        name: label in the report, e.g. ``"crop48"``.
        crop_size: training crop ``(D, H, W)``.
        batch_size: crops per iteration.
        features: BasicUNet feature sizes (six).
        skip_levels: skip levels x0..x3 the sites send (x4 always).
    """

    name: str
    crop_size: tuple[int, int, int]
    batch_size: int
    features: tuple[int, ...]
    skip_levels: tuple[int, ...]

    def model_config(self, learning_rate: float, weight_decay: float, seed: int, transfer_dtype: str = "float32"):
        """The :class:`SplitModelConfig` the sites and server would agree on for this size."""
        return SplitModelConfig(
            features=self.features,
            skip_levels=self.skip_levels,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            seed=seed,
            transfer_dtype=transfer_dtype,
        )

    def to_dict(self) -> dict:
        """Plain-JSON form for the report."""
        return {
            "name": self.name,
            "crop_size": list(self.crop_size),
            "batch_size": self.batch_size,
            "features": list(self.features),
            "skip_levels": list(self.skip_levels),
        }


@dataclass
class BenchSettings:
    """Everything a benchmark run needs; build it with :meth:`create`.

    Attributes:
        out_dir: where ``bench.json``, ``bench.md`` and the runs' folders go.
        device: the torch device of the in-process arms.
        amp: every party of every arm trains under bfloat16 autocast (the jobs' ``amp`` option; validation stays
            float32).
        quick: the small preset (seconds per arm; for tests and a first look).
        sizes: problem sizes, by increasing crop; the step time and bytes of each are measured.
        reference_index: the size that is the job's configuration: accuracy and the FLARE paths run at it.
        cases, volume_shape, seed: the phantom data.
        num_val_cases: held-out cases for Dice.
        warmup_steps, timed_steps: per arm and size, steps run before timing and steps timed.
        accuracy_iterations: training iterations of every accuracy arm (equal budget).
        accuracy_seeds: runs, from seeds ``seed, seed + 1, ...``, of the two split arms that differ only in their
            wire and of the equal-capacity centralized arm (one run of every other arm).
        flare_iterations: iterations of the FLARE simulator and POC runs.
        run_simulator, run_poc: whether the FLARE paths run.
        flare_timeout_s: bound of each FLARE run.
        learning_rate, weight_decay, loss, transfer_dtype: the job's optimisation settings.
        wire_precision: what the job puts on the wire (its ``QuantizeFeatures`` precision, else its transfer
            dtype): the in-process split arms send through it, as the FLARE arms do.
        sw_batch_size, sw_overlap: the job's sliding-window validation settings.
        loopback_repeats: repeats of the raw socket copy (the median is reported).
        progress: show progress bars.
        command: the command line, for the report.
        job_args: the job's workflow arguments these settings came from.
        preset: which preset these settings came from (``quick``, ``cpu``, ``cuda`` or ``128``).
        step_arms: the in-process arms whose step time is measured at every size (the split step always).
        run_accuracy: whether the accuracy arms run (the ``128`` preset times steps only, unless given iterations).
        flare_warmup_iterations: the first FLARE iterations left out of the FLARE paths' step means.
        link_rates: rates of the site links (``"1gbit"``, ``"100mbit"``) for POC runs with every party in a network
            namespace of its own (:mod:`splitunet.evaluation.bench.links`); empty: none.
        link_size_index: the size at which the link runs train (it is also timed in process).
        pipelined: also run the main job with ``pipeline_delay`` 1, so that its step time stands beside the
            lock-step run's (docs/design.md, "Pipelined steps"): in the simulator (``simulator_pipelined``, when
            the simulator runs) and over each rate's links (``links[rate]["pipelined"]``).
    """

    out_dir: Path
    device: torch.device
    amp: bool
    quick: bool
    sizes: tuple[ProblemSize, ...]
    reference_index: int
    cases: int
    volume_shape: tuple[int, int, int]
    seed: int
    num_val_cases: int
    warmup_steps: int
    timed_steps: int
    accuracy_iterations: int
    accuracy_seeds: int
    flare_iterations: int
    run_simulator: bool
    run_poc: bool
    flare_timeout_s: float
    learning_rate: float
    weight_decay: float
    loss: str
    transfer_dtype: str
    wire_precision: str
    sw_batch_size: int
    sw_overlap: float
    loopback_repeats: int = 3
    progress: bool = True
    command: str = ""
    job_args: Mapping = field(default_factory=dict)
    preset: str = "cpu"
    step_arms: tuple[str, ...] = STEP_ARM_NAMES
    run_accuracy: bool = True
    flare_warmup_iterations: int = 0
    link_rates: tuple[str, ...] = ()
    link_size_index: int | None = None
    pipelined: bool = False

    @property
    def reference(self) -> ProblemSize:
        """The size at which accuracy and the FLARE paths are measured."""
        return self.sizes[self.reference_index]

    @property
    def link_size(self) -> ProblemSize | None:
        """The size of the link runs, if any run."""
        return self.sizes[self.link_size_index] if self.link_rates else None

    @classmethod
    def create(
        cls,
        out_dir: str | Path,
        *,
        quick: bool = False,
        preset: str | None = None,
        device: str = "auto",
        amp: bool = False,
        flare: bool = True,
        poc: bool = True,
        iterations: int | None = None,
        seeds: int | None = None,
        cases: int | None = None,
        seed: int = 0,
        flare_timeout_s: float = 1800.0,
        progress: bool = True,
        command: Sequence[str] | None = None,
        link_rates: Sequence[str] = (),
        link_crop: int | None = None,
        pipelined: bool = False,
    ) -> BenchSettings:
        """Settings from the preset that fits the device (or ``quick``), with the job's training settings.

        Presets: ``quick`` (tiny features, crops 32^3 and 48^3, a handful of iterations, no POC); CPU (the job's
        features, crops 32^3 and the job's crop, sized for about 20 minutes on two cores); CUDA (the job's crop
        and 128^3 crops, the realistic size, with the job's features and iteration count); ``"128"`` (128^3 crops
        of 144^3 phantoms with the job's features, any device: 2 warm-up and 3 timed steps of the in-process split
        step, the simulator and POC; no accuracy arms unless ``iterations`` is given).

        ``pipelined`` adds a simulator run of the main job with ``pipeline_delay`` 1 (with ``flare``) and, with
        ``link_rates``, a pipelined POC run over each rate's links after the lock-step one.

        ``link_rates`` adds one POC run per rate with every party in a network namespace and each site's link
        shaped to that rate, at ``link_crop`` (default: the reference crop; another crop is also timed in process).

        Raises:
            SplitUNetConfigError: unknown or unavailable device or preset, FLARE paths without nvflare, bad counts
                or rates.
        """
        if preset is not None and preset not in PRESETS:
            raise SplitUNetConfigError(f"--preset must be one of {PRESETS}, got {preset!r}")
        if preset is not None and quick:
            raise SplitUNetConfigError("--quick is a preset of its own: give either --quick or --preset")
        link_rates = tuple(link_rates)
        for rate in link_rates:
            try:
                parse_rate(rate)
            except ValueError as error:
                raise SplitUNetConfigError(f"--link-rate: {error}") from error
        if link_rates and not flare_available():
            raise SplitUNetConfigError("--link-rate runs POC consortia: nvflare is not installed here")
        if device not in DEVICES:
            raise SplitUNetConfigError(f"--device must be one of {DEVICES}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise SplitUNetConfigError("--device cuda: torch sees no CUDA device here")
        resolved = select_device(device)
        if amp and resolved.type != "cuda":
            raise SplitUNetConfigError(
                "--amp needs a CUDA device: AMP is a GPU option (see splitunet.compute.mixed_precision)"
            )
        if flare and not flare_available():
            raise SplitUNetConfigError("nvflare is not installed here: pass --no-flare to run the in-process parts")
        job = job_training_args()
        missing = [key for key in _JOB_KEYS if key not in job]
        if missing:
            raise SplitUNetConfigError(f"the job's SplitLearningController sets no {missing}; the bench needs them")
        job_crop = tuple(int(c) for c in job["crop_size"])
        job_features = SplitModelConfig(features=job["features"]).features
        skip_levels = tuple(job.get("skip_levels", SplitModelConfig.skip_levels))
        batch = int(job["batch_size"])

        def size(crop: int | Sequence[int], features: Sequence[int]) -> ProblemSize:
            crop = (crop,) * 3 if isinstance(crop, int) else tuple(crop)
            return ProblemSize(f"crop{'x'.join(map(str, crop))}", crop, batch, tuple(features), skip_levels)

        extra = {}
        if preset == "128":
            name = preset
            preset = dict(
                sizes=(size(_REAL_CROP, job_features),),
                reference_index=0,
                cases=4,
                volume_shape=_REAL_VOLUME,
                warmup_steps=2,
                timed_steps=3,
                accuracy_iterations=0,
                accuracy_seeds=1,
                flare_iterations=5,
            )
            extra = dict(
                step_arms=("split_in_process",), run_accuracy=iterations is not None, flare_warmup_iterations=2
            )
        elif quick:
            name = "quick"
            preset = dict(
                sizes=(size(MIN_CROP_SIZE, _QUICK_FEATURES), size(48, _QUICK_FEATURES)),
                reference_index=0,
                cases=5,
                volume_shape=(48, 48, 48),
                warmup_steps=1,
                timed_steps=2,
                accuracy_iterations=6,
                accuracy_seeds=1,
                flare_iterations=3,
            )
            poc = False  # POC provisioning and start-up alone outlast the quick budget
        elif resolved.type == "cuda":
            name = "cuda"
            realistic = _REAL_CROP
            preset = dict(
                sizes=(size(job_crop, job_features), size(realistic, job_features)),
                reference_index=0,
                cases=8,
                volume_shape=(realistic,) * 3,
                warmup_steps=3,
                timed_steps=10,
                accuracy_iterations=int(job["num_iterations"]),
                accuracy_seeds=3,
                flare_iterations=20,
            )
        else:
            name = "cpu"
            preset = dict(
                sizes=(size(MIN_CROP_SIZE, job_features), size(job_crop, job_features)),
                reference_index=1,
                cases=16,
                volume_shape=(64, 64, 64),
                warmup_steps=2,
                timed_steps=5,
                accuracy_iterations=120,
                accuracy_seeds=3,
                flare_iterations=20,
            )
        if iterations is not None:
            preset["accuracy_iterations"] = int(iterations)
        if seeds is not None:
            preset["accuracy_seeds"] = int(seeds)
        if cases is not None:
            preset["cases"] = int(cases)
        if link_rates:
            reference = preset["sizes"][preset["reference_index"]]
            link = size(int(link_crop), reference.features) if link_crop else reference
            extra["link_size_index"] = _add_size(preset, link)
        settings = cls(
            out_dir=Path(out_dir),
            device=resolved,
            amp=bool(amp),
            quick=bool(quick),
            seed=int(seed),
            # The job's held-out count, but never more than a quarter of the (smaller) benchmark data set.
            num_val_cases=max(1, min(int(job.get("num_val_cases", preset["cases"])), preset["cases"] // 4)),
            run_simulator=bool(flare),
            run_poc=bool(flare and poc),
            flare_timeout_s=float(flare_timeout_s),
            learning_rate=float(job["learning_rate"]),
            # The controller passes its own defaults on to the same classes the bench uses.
            weight_decay=float(job.get("weight_decay", SplitModelConfig.weight_decay)),
            loss=str(job.get("loss", _validate_default("loss"))),
            transfer_dtype=str(job.get("transfer_dtype", SplitModelConfig.transfer_dtype)),
            wire_precision=job_wire_precision(),
            sw_batch_size=int(job.get("sw_batch_size", _validate_default("sw_batch_size"))),
            sw_overlap=float(job.get("sw_overlap", _validate_default("overlap"))),
            progress=progress,
            command=shlex.join(command) if command is not None else shlex.join(sys.argv),
            job_args=job,
            preset=name,
            link_rates=link_rates,
            pipelined=bool(pipelined and (flare or link_rates)),
            **extra,
            **preset,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check counts and sizes.

        Raises:
            SplitUNetConfigError: naming the setting and what was expected.
        """
        positive = {
            "timed_steps": self.timed_steps,
            "flare_iterations": self.flare_iterations,
            "loopback_repeats": self.loopback_repeats,
        }
        if self.run_accuracy:
            positive.update(accuracy_iterations=self.accuracy_iterations, accuracy_seeds=self.accuracy_seeds)
        for name, value in positive.items():
            if value < 1:
                raise SplitUNetConfigError(f"{name} must be >= 1, got {value}")
        if not 0 <= self.flare_warmup_iterations < self.flare_iterations:
            raise SplitUNetConfigError(
                f"flare_warmup_iterations must be in [0, {self.flare_iterations}), got {self.flare_warmup_iterations}"
            )
        unknown = sorted(set(self.step_arms) - set(STEP_ARM_NAMES))
        if unknown or "split_in_process" not in self.step_arms:
            raise SplitUNetConfigError(f"step_arms must include split_in_process, among {STEP_ARM_NAMES}: {unknown}")
        if self.link_rates and not (self.link_size_index is not None and 0 <= self.link_size_index < len(self.sizes)):
            raise SplitUNetConfigError(f"link_size_index {self.link_size_index} is not among {len(self.sizes)} sizes")
        if self.wire_precision not in WIRE_PRECISIONS:
            raise SplitUNetConfigError(
                f"the job sends {self.wire_precision} on the wire; the bench measures {list(WIRE_PRECISIONS)}"
            )
        if self.warmup_steps < 0:
            raise SplitUNetConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.cases < 2:
            raise SplitUNetConfigError(f"cases must be >= 2 (one to train, one to validate), got {self.cases}")
        if not 0 <= self.reference_index < len(self.sizes):
            raise SplitUNetConfigError(f"reference_index {self.reference_index} is not among {len(self.sizes)} sizes")
        for problem in self.sizes:
            if min(problem.crop_size) < MIN_CROP_SIZE:
                raise SplitUNetConfigError(f"crop size must be >= {MIN_CROP_SIZE} per axis, got {problem.crop_size}")
            if any(c > v for c, v in zip(problem.crop_size, self.volume_shape)):
                raise SplitUNetConfigError(
                    f"crop {problem.crop_size} does not fit the phantom grid {self.volume_shape}"
                )

    def to_dict(self) -> dict:
        """Plain-JSON form for the report."""
        return {
            "device": str(self.device),
            "amp": self.amp,
            "preset": self.preset,
            "quick": self.quick,
            "sizes": [problem.to_dict() for problem in self.sizes],
            "reference_size": self.reference.name,
            "cases": self.cases,
            "volume_shape": list(self.volume_shape),
            "seed": self.seed,
            "num_val_cases": self.num_val_cases,
            "warmup_steps": self.warmup_steps,
            "timed_steps": self.timed_steps,
            "accuracy_iterations": self.accuracy_iterations,
            "accuracy_seeds": self.accuracy_seeds,
            "flare_iterations": self.flare_iterations,
            "run_simulator": self.run_simulator,
            "run_poc": self.run_poc,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "loss": self.loss,
            "transfer_dtype": self.transfer_dtype,
            "wire_precision": self.wire_precision,
            "sw_batch_size": self.sw_batch_size,
            "sw_overlap": self.sw_overlap,
            "step_arms": list(self.step_arms),
            "run_accuracy": self.run_accuracy,
            "flare_warmup_iterations": self.flare_warmup_iterations,
            "link_rates": list(self.link_rates),
            "link_size": self.link_size.name if self.link_size else None,
            "pipelined": self.pipelined,
        }
