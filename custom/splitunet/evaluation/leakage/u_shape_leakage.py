"""``splitunet leakage-u-shape``: what the U-shape's server learns from ``x0`` and ``dL/du2``, measured.

The server of the three-part U-shape (:mod:`splitunet.u_shape`) receives each hospital's ``x0`` (the head's output)
and ``dL/du2`` (the gradient of the tail's loss at the middle's output), and it averages the heads and tails, so at
every round's first iteration it knows the head and tail each hospital runs. Two questions, with the vertical job's
attacks (:mod:`splitunet.evaluation.attacks`) and scores:

1. **Input inversion from x0.** At a round's first iteration the server inverts ``x0`` through the head it knows
   (``white_box``, :class:`~splitunet.evaluation.attacks.WhiteBoxInversion` on the four-channel head). Later in the
   round the hospital's local steps have moved the head; the server then has the stale average (``white_box_stale``),
   the stale average as the start of an UnSplit surrogate that follows the drift (``unsplit_from_average``), or the
   architecture alone (``unsplit``, data-free). Every reconstruction is scored per modality with the brain-mask SSIM
   against the mean auxiliary image at the same place (:func:`~splitunet.evaluation.metrics.image_leakage`).
2. **Label inference from dL/du2.** The gradient-norm attack (:func:`~splitunet.evaluation.leakage.infer_labels`:
   plain, smoothed and the adaptive rule with quantile thresholds) marks each crop's whole tumour; it is scored by
   Dice and AUC against the truth and against what the server can say without any gradient: the auxiliary patients'
   tumour frequency at the crop's place, the prediction of the tail it knows run on the ``u2`` and ``x0`` it holds,
   and the brightest voxels of the FLAIR it reconstructed.

The data come from an in-process run of the job's own trainers (:mod:`~splitunet.evaluation.leakage.u_shape_view`)
with the job's int8 wire, not from a FLARE capture: the server's ``CaptureFeatures`` filter would record ``x0`` and
``dL/du2``, but no filter sees the averages the workflow computes, and the white-box rows need them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitunet.atomic_files import write_json_atomic, write_text_atomic
from splitunet.compute.devices import torch_threads
from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.phantom import generate_phantom
from splitunet.evaluation.attacks import UnSplit, WhiteBoxInversion, build_encoder
from splitunet.evaluation.leakage.attack_suite import infer_labels
from splitunet.evaluation.leakage.u_shape_report import u_shape_markdown, u_shape_summary
from splitunet.evaluation.leakage.u_shape_truth import AuxiliaryHospital, HospitalCrops, replay_error
from splitunet.evaluation.leakage.u_shape_view import ServerView, check_server_view, record_server_view, wire_crossing
from splitunet.evaluation.metrics import image_leakage, mask_dice
from splitunet.evaluation.metrics.own_image_baseline import own_image_mask, roc_auc
from splitunet.horizontal.demo import ensure_hospital_phantoms
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.hospital_trainer import HospitalTrainer
from splitunet.u_shape.networks import IN_CHANNELS, seeded_part
from splitunet.u_shape.protocol import U2_LEVEL
from splitunet.u_shape.server_trainer import MiddleTrainer
from splitunet.wire.protocol import MODALITIES, REGIONS

__all__ = [
    "ROUND_START_ATTACKS",
    "MID_ROUND_ATTACKS",
    "UShapeLeakageSettings",
    "attacked_iterations",
    "invert_x0",
    "label_rows",
    "prepare_data",
    "run_u_shape_leakage",
]

# At a round's first iteration the server knows the head exactly; later it knows it as it was at the round's start.
ROUND_START_ATTACKS = ("white_box",)
MID_ROUND_ATTACKS = ("white_box_stale", "unsplit_from_average", "unsplit")
# The vertical suite's settings at x0 (splitunet.evaluation.leakage.attack_suite.invert_capture).
_WHITE_BOX_TV = 0.1
_UNSPLIT_TV = 0.3
# Auxiliary patients come from this seed offset, so none of them is a hospital's.
_AUX_SEED_OFFSET = 1000


@dataclass(frozen=True)
class UShapeLeakageSettings:
    """Size of the measured run and the attacks' budgets.

    Args:
        hospitals: hospitals (phantom data sets ``hospital-1`` from ``seed``, ``hospital-2`` from ``seed + 1``, ...).
        cases: phantom cases per hospital (one is held out, as the job's ``num_val_cases``).
        shape: phantom volume shape.
        crop_size, batch_size, features, learning_rate, seed: the job's model settings
            (:class:`~splitunet.u_shape.config.UShapeConfig`); the defaults are the job's.
        iterations_per_round: iterations between averagings (the job's 20); the attacked iterations are the first
            of round one, its last and the first of round two (:func:`attacked_iterations`).
        aux_cases: the attacker's auxiliary phantom patients (priors).
        wire_bits: bits of the wire's integer codes (the job's int8); ``None``: float32.
        white_box_iterations: Adam steps of each white-box inversion.
        unsplit_iterations: outer iterations of each UnSplit inversion.
        threads: torch CPU threads during the run.
    """

    hospitals: int = 2
    cases: int = 4
    shape: tuple[int, int, int] = (64, 64, 64)
    crop_size: tuple[int, int, int] = (48, 48, 48)
    batch_size: int = 2
    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    learning_rate: float = 2e-3
    seed: int = 0
    iterations_per_round: int = 20
    aux_cases: int = 4
    wire_bits: int | None = 8
    white_box_iterations: int = 200
    unsplit_iterations: int = 60
    threads: int = 1

    def __post_init__(self):
        if self.hospitals < 1 or self.cases < 2 or self.aux_cases < 1:
            raise ValueError("need at least one hospital of two cases and one auxiliary case")
        if self.iterations_per_round < 2:
            raise ValueError("iterations_per_round must be >= 2, so that a round has an iteration after its first")

    @classmethod
    def quick(cls) -> UShapeLeakageSettings:
        """Tiny sizes and budgets (tests, and a check of the pipeline): 40^3 phantoms, 32^3 crops, two iterations a
        round."""
        return cls(
            cases=2,
            shape=(40, 40, 40),
            crop_size=(32, 32, 32),
            batch_size=1,
            features=(8, 8, 16, 16, 16, 8),
            iterations_per_round=2,
            aux_cases=2,
            white_box_iterations=20,
            unsplit_iterations=4,
        )

    @property
    def names(self) -> list[str]:
        """The hospitals' names (those of the U-shape's simulator demo, whose phantom data this shares)."""
        return [f"hospital-{index + 1}" for index in range(self.hospitals)]

    def config(self) -> UShapeConfig:
        """The settings the server sends every hospital."""
        return UShapeConfig(
            features=tuple(self.features),
            learning_rate=self.learning_rate,
            seed=self.seed,
            batch_size=self.batch_size,
            crop_size=tuple(self.crop_size),
        )

    def to_dict(self) -> dict:
        """Plain JSON values."""
        content = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in content.items()}


def attacked_iterations(iterations_per_round: int) -> tuple[int, int, int]:
    """The first iteration of round one, its last, and the first of round two."""
    return 1, iterations_per_round, iterations_per_round + 1


def _head_encoder_state(head_state: Mapping[str, torch.Tensor], features: Sequence[int]) -> dict:
    """A four-channel :class:`~splitunet.networks.SiteEncoder` state whose ``conv_0`` is the head (the deeper blocks
    are never run: the attacks stop at level 0)."""
    encoder = build_encoder(features, in_channels=IN_CHANNELS)
    return {**encoder.state_dict(), **{name: tensor.clone() for name, tensor in head_state.items()}}


def invert_x0(
    attack: str,
    x0: torch.Tensor,
    known_head: Mapping[str, torch.Tensor],
    config: UShapeConfig,
    prior: torch.Tensor,
    settings: UShapeLeakageSettings,
) -> tuple[torch.Tensor, dict]:
    """Reconstruct the four-channel crops behind ``x0`` as the server can.

    Args:
        attack: one of :data:`ROUND_START_ATTACKS` or :data:`MID_ROUND_ATTACKS`.
        x0: ``(B, features[0], D, H, W)`` as received.
        known_head: the head's state dict as the server knows it (exact at a round's start, stale later).
        config: the job's settings.
        prior: ``(B, 4, D, H, W)`` mean auxiliary image (where every inversion starts; UnSplit's sign reference).
        settings: the budgets.

    Returns:
        ``(reconstruction (B, 4, D, H, W), stats)``.
    """
    observed = {0: x0}
    crop = tuple(config.crop_size)
    if attack in ("white_box", "white_box_stale"):
        state = _head_encoder_state(known_head, config.features)
        # From the mean image (the attacker has it): as good as from noise after 200 steps at 48^3, and far better
        # after 100 for T1, whose contrast the head's features show weakest.
        inversion = WhiteBoxInversion(
            config.features,
            state,
            iterations=settings.white_box_iterations,
            tv_weight=_WHITE_BOX_TV,
            seed=settings.seed,
            init="prior",
        )
        return inversion.reconstruct(observed, crop, prior=prior)
    if attack == "unsplit_from_average":
        # The surrogate starts from the stale head and moves at the hospitals' own learning rate: the drift it has
        # to follow is a few of their Adam steps.
        inversion = UnSplit(
            config.features,
            outer_iterations=settings.unsplit_iterations,
            lr_model=config.learning_rate,
            tv_weight=_UNSPLIT_TV,
            init="reference",
            seed=settings.seed,
            initial_state=_head_encoder_state(known_head, config.features),
        )
        return inversion.reconstruct(observed, crop, reference=prior)
    if attack == "unsplit":
        inversion = UnSplit(
            config.features,
            outer_iterations=settings.unsplit_iterations,
            tv_weight=_UNSPLIT_TV,
            init="reference",
            seed=settings.seed,
            in_channels=IN_CHANNELS,
        )
        return inversion.reconstruct(observed, crop, reference=prior)
    raise ValueError(f"unknown attack {attack!r}; choose from {ROUND_START_ATTACKS + MID_ROUND_ATTACKS}")


def _inversion_rows(base: dict, reconstruction, truth, prior, seconds: float) -> list[dict]:
    """One row per modality: the per-crop scores of that channel against the same channel's prior."""
    rows = []
    for channel, modality in enumerate(MODALITIES):
        part = slice(channel, channel + 1)
        scores = image_leakage(reconstruction[:, part], truth[:, part], prior[:, part])
        per_crop = {key: scores[key] for key in ("ssim", "ssim_prior", "ssim_brain", "ssim_prior_brain")}
        rows.append({**base, "modality": modality, **scores["mean"], "per_crop": per_crop, "seconds": seconds})
    return rows


def _top_voxels(score: torch.Tensor, marked: int) -> torch.Tensor:
    """The ``marked`` highest-scoring voxels of a ``(1, 1, D, H, W)`` score as a mask (ties broken by order)."""
    return own_image_mask(score, "flair", marked)  # "flair": the tumour is where the score is high


def label_rows(
    du2: torch.Tensor,
    crop_size: Sequence[int],
    truth: torch.Tensor,
    baselines: Mapping[str, torch.Tensor],
) -> list[dict]:
    """Label inference from ``dL/du2``, one row per crop, beside the server's gradient-free baselines.

    Args:
        du2: ``(B, features[1], D/2, H/2, W/2)`` as the server received it: the attack's only input.
        crop_size: the crop size.
        truth: the crops' true whole-tumour masks ``(B, 1, D, H, W)`` (scoring only).
        baselines: name -> per-voxel tumour score ``(B, 1, D, H, W)`` the server has without gradients; each marks
            as many voxels as the plain gradient attack did (as the vertical suite's own-image baseline does), and
            its AUC needs no threshold.

    Returns:
        per crop: the :func:`~splitunet.evaluation.leakage.infer_labels` scores (Dice plain, smoothed, adaptive;
        AUC; random-mask chance) and ``baselines``: name -> ``{"dice", "auc"}``.
    """
    rows = []
    for index in range(du2.shape[0]):
        one = slice(index, index + 1)
        row = infer_labels({U2_LEVEL: du2[one]}, crop_size, truth[one])
        marked = round(row["fraction_marked"] * truth[one].numel())
        row["baselines"] = {}
        for name, score in baselines.items():
            mask = _top_voxels(score[one], marked)
            row["baselines"][name] = {
                "dice": float(mask_dice(mask, truth[one]).mean()),
                "auc": float(roc_auc(score[one], truth[one]).nanmean()),
            }
        rows.append(row)
    return rows


def _known_tail_prediction(view: ServerView, known: Mapping, x0: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """The whole-tumour probability the tail the server knows gives on the ``u2`` and ``x0`` it holds."""
    tail = seeded_part("tail", view.config.features, view.config.seed)
    tail.load_state_dict(known["tail"])
    with torch.no_grad():
        logits = tail.eval()(u2, x0)
    channel = REGIONS.index("WT")
    return torch.sigmoid(logits[:, channel : channel + 1])


def prepare_data(out_dir: Path, settings: UShapeLeakageSettings) -> tuple[dict[str, Path], Path]:
    """The hospitals' phantom data sets and the attacker's auxiliary patients (made once, reused)."""
    # The settings name the hospitals, cases, shape and seed as the demos' do: the same phantoms as theirs.
    folders = ensure_hospital_phantoms(out_dir / "data", settings)
    aux = out_dir / "data" / "auxiliary"
    if not (aux / "dataset.json").is_file():
        generate_phantom(
            aux, settings.aux_cases, shape=settings.shape, seed=settings.seed + _AUX_SEED_OFFSET, progress=False
        )
    return folders, aux


def run_u_shape_leakage(out_dir: str | Path, settings: UShapeLeakageSettings | None = None) -> dict:
    """Train the U-shape in process, attack what its server held, write ``report.json`` and ``report.md``.

    Args:
        out_dir: where the data, ``report.json`` and ``report.md`` go (phantom data already there are reused).
        settings: sizes and budgets (default: the job's model at 48^3 crops on two 64^3 phantom hospitals).

    Returns:
        the report: settings, the run's losses, the check of the server's view, the replay check, inversion rows
        (per hospital, iteration, attack and modality) and label rows (per crop), the pooled summary and verdicts
        (:func:`~splitunet.evaluation.leakage.u_shape_report.u_shape_summary`), seconds.
    """
    settings = settings or UShapeLeakageSettings()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch_threads(settings.threads):
        report = _run(out_dir, settings)
    write_json_atomic(report, out_dir / "report.json")
    write_text_atomic(u_shape_markdown(report), out_dir / "report.md")
    return report


def _run(out_dir: Path, settings: UShapeLeakageSettings) -> dict:
    started = time.perf_counter()
    folders, aux_folder = prepare_data(out_dir, settings)
    config = settings.config()
    hospitals = {}
    for name, folder in folders.items():
        hospitals[name] = HospitalTrainer(HospitalFolder(folder, party=name))
        hospitals[name].build(config)
    server = MiddleTrainer("cpu")
    server.build(config)
    iterations = attacked_iterations(settings.iterations_per_round)
    view, losses = record_server_view(
        hospitals, server, settings.iterations_per_round, iterations, wire_crossing(settings.wire_bits)
    )
    trained_s = time.perf_counter() - started
    report = {
        "settings": settings.to_dict(),
        "iterations": list(iterations),
        "hospitals": view.case_counts,
        "losses": losses,
        "server_view": check_server_view(view),  # raises if the server held anything of an image's or label's shape
        "replay": {},
        "inversion": [],
        "labels": [],
    }
    aux = AuxiliaryHospital(HospitalFolder(aux_folder, party="attacker"))
    for name in view.hospitals:
        crops = HospitalCrops(HospitalFolder(folders[name], party=f"evaluator of {name}"), config)
        for iteration in iterations:
            print(f"attacking {name} at iteration {iteration}", flush=True)
            report_part = _attack(view, name, iteration, crops, aux, settings)
            report["inversion"] += report_part["inversion"]
            report["labels"] += report_part["labels"]
            if report_part["replay"] is not None:
                report["replay"][f"{name}@{iteration}"] = report_part["replay"]
    report["summary"] = u_shape_summary(report)
    report["training_s"] = round(trained_s, 1)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def _attack(
    view: ServerView,
    name: str,
    iteration: int,
    crops: HospitalCrops,
    aux: AuxiliaryHospital,
    settings: UShapeLeakageSettings,
) -> dict:
    """Every attack on one hospital's exchange of one iteration, scored."""
    exchange = view.exchange(name, iteration)
    known, local_steps = view.known_at(iteration)
    config = view.config
    plan = crops.plan(iteration)
    images, truth = crops.images(iteration), crops.region(iteration, "WT")
    prior = aux.image_prior(plan)
    replay = None
    if local_steps == 0:
        head = seeded_part("head", config.features, config.seed)
        head.load_state_dict(known["head"])
        replay = replay_error(head.eval(), images, exchange.x0)
        if not replay["matches"]:
            raise RuntimeError(
                f"the replayed crops of {name} at iteration {iteration} do not give the x0 its server received "
                f"(max error {replay['max_abs_error']:.3g} > {replay['tolerance']:.3g}): the truth would be wrong"
            )
    base = {"hospital": name, "iteration": iteration, "local_steps": local_steps}
    inversion, reconstructions = [], {}
    for attack in ROUND_START_ATTACKS if local_steps == 0 else MID_ROUND_ATTACKS:
        started = time.perf_counter()
        reconstruction, _ = invert_x0(attack, exchange.x0, known["head"], config, prior, settings)
        seconds = round(time.perf_counter() - started, 1)
        reconstructions[attack] = reconstruction
        inversion += _inversion_rows({**base, "attack": attack}, reconstruction, images, prior, seconds)
    baselines = {
        "tumour_frequency": aux.tumour_frequency(plan),
        "prediction": _known_tail_prediction(view, known, exchange.x0, exchange.u2),
    }
    # The server's own white-box reconstruction, read as a hospital reads its FLAIR: the tumour is bright.
    white_box = reconstructions.get("white_box", reconstructions.get("white_box_stale"))
    if white_box is not None:
        flair = MODALITIES.index("flair")
        baselines["reconstructed_flair"] = white_box[:, flair : flair + 1]
    labels = [
        {**base, "crop": index, **row}
        for index, row in enumerate(label_rows(exchange.du2, config.crop_size, truth, baselines))
    ]
    return {"inversion": inversion, "labels": labels, "replay": replay}
