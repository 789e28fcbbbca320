"""``splitunet gradient-inversion``: invert one hospital's update of the FedAvg U-Net, without DP and with DP-SGD.

For each seed: phantom cases in MSD layout, read as a FedAvg hospital reads them (:class:`HospitalFolder`); one case is
the hospital's training crop, the others are the attacker's auxiliary cases; the crop's origin is drawn without
looking at labels; the global model is :class:`FedAvgUNet` as the job initialises it (round 1: the server knows these
weights, it sent them). The hospital's update for the crop is observed without DP and with DP-SGD at each epsilon
(:mod:`~splitunet.evaluation.attacks.gradient_inversion_update`), and :class:`GradientInversion` attacks each. The same
runs on the positive control (:class:`~splitunet.evaluation.attacks.gradient_inversion_control.DenseSegmenter`), a
model whose update determines its input: an attack that fails there is broken, not stopped.

Scores, per modality channel against the crop (:func:`splitunet.evaluation.metrics.image_leakage`): 3D SSIM over the
crop and inside the brain, PSNR, and the same for the attacker's prior (the mean auxiliary image at the same place);
the leak reported is ``max(SSIM, SSIM of the prior)``. Gains over the prior get 95 % Student's t intervals over
crops and channels (:func:`splitunet.evaluation.intervals.t_interval`; channels of one crop are not independent, so
the interval over crops of the channel mean is given too). In ``"joint"`` label mode the inferred whole-tumour mask
is scored by Dice against the truth and against the attacker's baseline: as many voxels, those where auxiliary cases
most often have tumour.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitunet.atomic_files import write_text_atomic
from splitunet.compute.devices import torch_threads
from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.phantom import generate_phantom
from splitunet.data.sampling import extract_crop
from splitunet.evaluation.attacks.gradient_inversion import LABEL_MODES, WEIGHTINGS, GradientInversion
from splitunet.evaluation.attacks.gradient_inversion_control import DenseSegmenter
from splitunet.evaluation.attacks.gradient_inversion_report import plot_modalities, report_markdown, summarize
from splitunet.evaluation.attacks.gradient_inversion_update import (
    DPSetting,
    noise_for_epsilon,
    observed_update,
    per_sample_gradient_norms,
)
from splitunet.evaluation.metrics import image_leakage, mask_dice
from splitunet.horizontal.model import FedAvgUNet
from splitunet.networks.losses import make_loss
from splitunet.wire.protocol import MODALITIES, REGIONS

__all__ = [
    "GradientInversionStudy",
    "PRESETS",
    "run_gradient_inversion",
    "study_from_args",
    "command_line",
    "NO_DP",
    "MODELS",
]

# The command's options besides --out, in the order the report spells them.
_OPTIONS = ("quick", "preset", "seeds", "epsilons", "delta", "iterations", "restarts", "labels")

NO_DP = "no DP"
# Named configurations of the command: "default" (the job's crop size and a short attack) and "tiny"
# (:meth:`GradientInversionStudy.tiny`).
PRESETS = ("default", "tiny")
MODELS = ("unet", "dense_control")
_WT = REGIONS.index("WT")


def _model(name: str, study: "GradientInversionStudy", seed: int) -> nn.Module:
    if name == "unet":
        # The FedAvg job's global model at round 1, as the server initialised (and knows) it.
        return FedAvgUNet(study.features, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DenseSegmenter(len(MODALITIES), len(REGIONS), study.crop_size)


@dataclass(frozen=True)
class GradientInversionStudy:
    """What one study runs: data, model, DP settings and the attack's budget.

    Args:
        seeds: one crop, model initialisation and attack noise per seed.
        epsilons: the DP settings, each one DP-SGD step at this epsilon (``delta``, sample rate 1).
        delta: delta of every epsilon (1e-5).
        cases: phantom cases (one is attacked per seed, the others are auxiliary).
        shape: phantom volume shape.
        crop_size: the hospital's crop ``(D, H, W)``; the U-Net's instance norm needs at least 2 voxels at the
            1/16 bottleneck (32 on one axis, 16 on the others) and SSIM 11 per axis.
        features: the U-Net's widths.
        batch_size: crops in the hospital's batch.
        labels, weighting, layers, iterations, restarts, lr, tv_weight, decay: :class:`GradientInversion`'s.
        threads: torch threads while the study runs (1: the figures do not depend on a busy machine's cores).
        models: ``"unet"`` (the FedAvg job's U-Net) and ``"dense_control"`` (:class:`DenseSegmenter`, the positive
            control: the same attack and data on a model whose update does determine the input).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    epsilons: tuple[float, ...] = (1.0, 3.0, 10.0)
    delta: float = 1e-5
    cases: int = 6
    shape: tuple[int, int, int] = (48, 48, 48)
    crop_size: tuple[int, int, int] = (32, 32, 32)
    features: tuple[int, ...] = (4, 8, 8, 16, 16, 4)
    batch_size: int = 1
    labels: str = "joint"
    weighting: str = "global"
    layers: str | None = None
    iterations: int = 40
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float = 0.01
    decay: bool = True
    threads: int = 1
    models: tuple[str, ...] = ("unet", "dense_control")

    def __post_init__(self):
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {MODELS}, got {self.models}")
        if self.labels not in LABEL_MODES or self.weighting not in WEIGHTINGS:
            raise ValueError(f"labels must be in {LABEL_MODES} and weighting in {WEIGHTINGS}")
        if not self.seeds or any(not e > 0 for e in self.epsilons):
            raise ValueError(f"need at least one seed and positive epsilons, got {self.seeds}, {self.epsilons}")
        if self.cases < self.batch_size + 1:
            raise ValueError(f"cases must exceed the batch size ({self.batch_size}): auxiliary cases are needed")

    @classmethod
    def quick(cls, **changes) -> "GradientInversionStudy":
        """Tiny sizes that check the pipeline in seconds (one seed, one epsilon, a few attack steps)."""
        settings = {
            "seeds": (0,),
            "epsilons": (1.0,),
            "cases": 3,
            "shape": (40, 40, 40),
            "crop_size": (16, 32, 32),
            "iterations": 3,
            "restarts": 1,
        }
        return cls(**{**settings, **changes})

    @classmethod
    def tiny(cls, **changes) -> "GradientInversionStudy":
        """The tiny configuration, where the attack beats the prior without DP (docs/gradient_inversion.md).

        The smallest crop the U-Net and the score take, 16 x 16 x 32 (SSIM's 11-voxel window on every axis; the
        instance norm's two voxels at the 1/16 bottleneck), of the same four-modality :class:`FedAvgUNet` with
        features ``(16, 4, 4, 4, 4, 16)``: the first encoder level and the last decoder level run at full resolution
        with 16 channels, so the update holds many weighted sums of every 3 x 3 x 3 patch of every modality (95
        thousand parameters for the crop's 32 768 values). The labels are given to the attacker (``"known"``, an
        oracle: jointly optimised labels did not beat the prior here), with 50 attack steps at a constant rate
        (they reach lower gradient distances than 50 with the rate cut, a choice the attacker can make without the
        truth). The default study keeps the job's crop size.
        """
        settings = {
            "crop_size": (16, 16, 32),
            "features": (16, 4, 4, 4, 4, 16),
            "labels": "known",
            "iterations": 50,
            "decay": False,
        }
        return cls(**{**settings, **changes})


def _crop(volume: np.ndarray, origin: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(extract_crop(volume, origin, size), dtype=np.float32))[None]


@dataclass
class _Batch:
    images: torch.Tensor
    regions: torch.Tensor
    prior: torch.Tensor
    label_prior: torch.Tensor
    aux_images: torch.Tensor
    aux_regions: torch.Tensor
    cases: list[str]
    origin: list[int]


def _batch(data: HospitalFolder, study: GradientInversionStudy, seed: int) -> _Batch:
    """The attacked crops and the attacker's auxiliary crops at the same place (origin drawn without labels)."""
    cases = data.case_ids
    rng = np.random.default_rng(seed)
    first = (seed * study.batch_size) % len(cases)
    targets = [cases[(first + i) % len(cases)] for i in range(study.batch_size)]
    auxiliary = [case for case in cases if case not in targets]
    shape = data.shape(targets[0])
    origin = [int(rng.integers(0, max(1, s - c + 1))) for s, c in zip(shape, study.crop_size)]
    images = torch.cat([_crop(data.read(case)[0], origin, study.crop_size) for case in targets])
    regions = torch.cat([_crop(data.read(case)[1], origin, study.crop_size) for case in targets]).float()
    aux_images = torch.cat([_crop(data.read(case)[0], origin, study.crop_size) for case in auxiliary])
    aux_regions = torch.cat([_crop(data.read(case)[1], origin, study.crop_size) for case in auxiliary]).float()
    return _Batch(
        images,
        regions,
        aux_images.mean(0, keepdim=True),
        aux_regions.mean(0, keepdim=True),
        aux_images,
        aux_regions,
        targets,
        origin,
    )


def _label_scores(inferred: torch.Tensor, batch: _Batch) -> dict:
    """Whole-tumour Dice of the inferred mask, and of as many voxels of highest auxiliary tumour frequency."""
    truth = batch.regions[:, _WT : _WT + 1]
    mask = (inferred[:, _WT : _WT + 1] > 0.5).float()
    frequency = batch.label_prior[:, _WT : _WT + 1].expand_as(truth).flatten(1)
    baseline = torch.zeros_like(frequency)
    for row, count in enumerate(mask.flatten(1).sum(1).long().tolist()):
        if count:
            baseline[row, torch.topk(frequency[row], count).indices] = 1.0
    return {
        "dice_wt": mask_dice(mask, truth).tolist(),
        "dice_wt_prior_frequency": mask_dice(baseline.reshape(truth.shape), truth).tolist(),
        "marked_voxels": mask.flatten(1).sum(1).tolist(),
        "true_voxels": truth.flatten(1).sum(1).tolist(),
    }


def _image_scores(reconstruction: torch.Tensor, batch: _Batch) -> dict:
    """Per modality channel: SSIM (crop, brain), PSNR and the prior's, from the bundle's own leakage metric."""
    scores = {}
    for channel, modality in enumerate(MODALITIES):
        part = slice(channel, channel + 1)
        result = image_leakage(reconstruction[:, part], batch.images[:, part], batch.prior[:, part])
        scores[modality] = {
            key: result["mean"][key]
            for key in ("ssim", "ssim_prior", "ssim_brain", "ssim_prior_brain", "psnr", "psnr_prior", "ssim_reported")
        }
    return scores


def _clip_norm(model: torch.nn.Module, batch: _Batch, loss_fn) -> float:
    """C: the median per-sample gradient norm of the auxiliary crops, as a hospital calibrating its clip finds it.

    At C no larger than the sample's own norm the clipped gradient has norm C and the noise std is sigma * C, so
    the signal-to-noise ratio is the largest DP-SGD allows at that sigma: the attacker's best case.
    """
    return float(per_sample_gradient_norms(model, batch.aux_images, batch.aux_regions, loss_fn).median())


def _one_model(name: str, batch: _Batch, study: GradientInversionStudy, seed: int) -> tuple[list[dict], dict]:
    model = _model(name, study, seed)
    loss_fn = make_loss("dice_ce")
    clip = _clip_norm(model, batch, loss_fn)
    settings: list[tuple[str, DPSetting | None]] = [(NO_DP, None)]
    for epsilon in study.epsilons:
        sigma = noise_for_epsilon(epsilon, study.delta)
        settings.append((f"epsilon {epsilon:g}", DPSetting(sigma, clip, study.delta)))
    attack = GradientInversion(
        model, loss_fn, labels=study.labels, layers=study.layers, weighting=study.weighting,
        iterations=study.iterations, restarts=study.restarts, lr=study.lr, tv_weight=study.tv_weight,
        decay=study.decay, seed=seed,
    )  # fmt: skip
    runs, images = [], {}
    for setting, dp in settings:
        update = observed_update(model, batch.images, batch.regions, loss_fn, dp, seed=seed)
        result = attack.invert(
            update.gradient, study.batch_size, batch.prior, label_prior=batch.label_prior,
            true_labels=batch.regions if study.labels == "known" else None,
        )  # fmt: skip
        images[f"{name}, {setting}"] = result.image
        runs.append({
            "model": name,
            "seed": seed,
            "setting": setting,
            "cases": batch.cases,
            "origin": batch.origin,
            "epsilon": update.epsilon,
            "delta": None if dp is None else dp.delta,
            "noise_multiplier": None if dp is None else dp.noise_multiplier,
            "max_grad_norm": None if dp is None else dp.max_grad_norm,
            "attack": result.stats,
            "channels": _image_scores(result.image, batch),
            "labels": _label_scores(result.labels, batch) if study.labels == "joint" else None,
        })  # fmt: skip
    return runs, images


def _one_seed(data: HospitalFolder, study: GradientInversionStudy, seed: int) -> tuple[list[dict], dict]:
    batch = _batch(data, study, seed)
    runs, images = [], {"truth": batch.images, "prior": batch.prior}
    for name in study.models:
        model_runs, model_images = _one_model(name, batch, study, seed)
        runs.extend(model_runs)
        images.update(model_images)
    return runs, images


def run_gradient_inversion(out: str | Path, study: GradientInversionStudy, command: str = "") -> dict:
    """Run the study and write ``report.json``, ``report.md`` and ``reconstructions.png`` in ``out``.

    The phantom is written once to ``out/data`` (seed 0) and reused.

    Returns:
        the report (as written to ``report.json``).
    """
    out = Path(out)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch_threads(study.threads):
        root = out / "data" / "phantom_msd"
        if not (root / "dataset.json").is_file():
            generate_phantom(root, study.cases, shape=study.shape, seed=0, progress=False)
        data = HospitalFolder(root, "msd", party="hospital")
        runs, figure_images = [], None
        for seed in study.seeds:
            seed_runs, images = _one_seed(data, study, seed)
            runs.extend(seed_runs)
            figure_images = figure_images or images
    figure = plot_modalities(figure_images, out / "reconstructions.png", f"gradient inversion, seed {study.seeds[0]}")
    report = {
        "command": command or "splitunet gradient-inversion",
        "date": date.today().isoformat(),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "study": {**asdict(study), "modalities": list(MODALITIES)},
        "summary": summarize(runs),
        "runs": runs,
        "figure": figure.name,
    }
    write_text_atomic(json.dumps(report, indent=2, default=float) + "\n", out / "report.json")
    write_text_atomic(report_markdown(report) + "\n", out / "report.md")
    return report


def command_line(args) -> str:
    """The command as typed, rebuilt from parsed ``args`` (for the report)."""
    parts = ["splitunet gradient-inversion", f"--out {args.out}"]
    for name in _OPTIONS:
        value = getattr(args, name, None)
        if value is True:
            parts.append(f"--{name}")
        elif value not in (None, False, [], ()):
            values = value if isinstance(value, (list, tuple)) else [value]
            parts.append(f"--{name} " + " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values))
    return " ".join(parts)


def study_from_args(args) -> GradientInversionStudy:
    """The study the command line asks for (``--quick`` or ``--preset``, then any explicit option)."""
    chosen = {}
    if args.seeds:
        chosen["seeds"] = tuple(args.seeds)
    if args.epsilons:
        chosen["epsilons"] = tuple(args.epsilons)
    for name in ("iterations", "restarts", "labels", "delta"):
        if getattr(args, name, None) is not None:
            chosen[name] = getattr(args, name)
    if args.quick:
        return GradientInversionStudy.quick(**chosen)
    if getattr(args, "preset", None) == "tiny":
        return GradientInversionStudy.tiny(**chosen)
    return replace(GradientInversionStudy(), **chosen)
