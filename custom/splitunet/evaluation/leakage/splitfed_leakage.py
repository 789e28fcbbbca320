"""``splitunet leakage-splitfed``: what a SplitFed server learns from the encoder averages it computes, measured.

The SplitFed job (``split_unet_splitfed``) averages the encoders of the sites that share a modality every R
iterations (:mod:`splitunet.flare.encoder_averaging`): the server receives every site's copy and sends the average
back. The sites draw a private encoder seed, so before the first average the server knows no encoder; from then on

- at a site's first activations after an average, the encoder behind them is the average: the server inverts them
  white-box (``white_box``);
- at the site's last activations of the round, after its local Adam steps, the server has the stale average
  (``white_box_stale``), the stale average as the start of an UnSplit surrogate that follows the drift
  (``unsplit_from_average``), or the architecture alone (``unsplit``, what it has in the plain vertical job); and,
  once the next averaging brings the site's copy, that copy, one Adam step after those activations
  (``white_box_next_upload``: the server only has to keep the activations until then).

The data come from a real FLARE simulator run of the generated job with the server's capture filters on
(``CaptureFeatures`` for the activations of the attacked rounds, ``CaptureWeights`` for every averaging), read back
as the server held them (:mod:`~splitunet.evaluation.leakage.splitfed_view`). The attacks read only what crossed the
server plus public knowledge (the job's settings, auxiliary phantom patients); the evaluator alone reads the sites'
data, for the truth. Every inversion starts from the attacker's prior (the mean auxiliary image cut at the crop's
place) and is scored with the brain-mask SSIM against that prior, as ``splitunet leakage-u-shape`` does
(:mod:`~splitunet.evaluation.leakage.splitfed_report`). Label inference from the returned gradients is the
vertical job's (``splitunet leakage``) and is not repeated.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitunet.atomic_files import write_json_atomic, write_text_atomic
from splitunet.compute.devices import torch_threads
from splitunet.data.case_keys import read_or_create_secret
from splitunet.data.party_data import ModalityFolder
from splitunet.evaluation.attacks import EncoderPrefix, UnSplit, WhiteBoxInversion, build_encoder
from splitunet.evaluation.leakage.attack_suite import PER_CROP_KEYS
from splitunet.evaluation.leakage.captured_run import ACTIVATIONS, CapturedRun
from splitunet.evaluation.leakage.ground_truth import AuxiliaryImages, GroundTruth
from splitunet.evaluation.leakage.report import auxiliary_phantom
from splitunet.evaluation.leakage.splitfed_report import splitfed_markdown, splitfed_summary
from splitunet.evaluation.leakage.splitfed_view import (
    AttackPoint,
    SplitFedView,
    check_averages,
    describe_view,
)
from splitunet.evaluation.leakage.u_shape_truth import replay_error
from splitunet.evaluation.metrics import image_leakage
from splitunet.wire.protocol import MODALITIES

__all__ = [
    "ROUND_START_ATTACKS",
    "ROUND_END_ATTACKS",
    "SplitFedLeakageSettings",
    "invert_activations",
    "run_splitfed_leakage",
]

# At a site's first activations after an average the server knows its encoder exactly; at its last ones of the round
# it knows the stale average, and after the next averaging the site's own copy, one step later.
ROUND_START_ATTACKS = ("white_box",)
ROUND_END_ATTACKS = ("white_box_stale", "white_box_next_upload", "unsplit_from_average", "unsplit")
# The vertical suite's TV weights (splitunet.evaluation.leakage.attack_suite.invert_capture): x0, and coarser levels.
_TV_X0, _TV_COARSE = 0.1, 1.0
_UNSPLIT_TV_X0, _UNSPLIT_TV_COARSE = 0.3, 1.0


@dataclass(frozen=True)
class SplitFedLeakageSettings:
    """Size of the measured run and the attacks' budgets.

    Args:
        sites_per_modality: sites holding each modality, each for other patients (the job's two).
        cases: phantom patients, dealt to the groups (each group's sites form one cohort).
        shape: phantom volume shape.
        crop_size, batch_size, features, learning_rate, seed: the job's model settings (the defaults are the job's,
            but for the crop size, cut to 32^3 so that the attacks fit the 2-core machine).
        every: iterations between averagings (the job's R, 10).
        attacked_rounds: rounds after an averaging that are captured whole and attacked; the run trains one round
            before them (the server knows no encoder then) and ends at an averaging.
        num_val_cases: held-out cases per cohort (validated once, at the end).
        white_box_iterations: Adam steps of each white-box inversion.
        unsplit_iterations: outer iterations of each UnSplit inversion.
        threads: torch CPU threads of the attacks (the sites compute on one each, the server on every core).
        timeout_s: the simulator run's time limit.
    """

    sites_per_modality: int = 2
    cases: int = 12
    shape: tuple[int, int, int] = (48, 48, 48)
    crop_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    learning_rate: float = 2e-3
    seed: int = 0
    every: int = 10
    attacked_rounds: int = 2
    num_val_cases: int = 1
    white_box_iterations: int = 150
    unsplit_iterations: int = 60
    threads: int = 1
    timeout_s: float = 1800.0

    def __post_init__(self):
        if self.sites_per_modality < 2:
            raise ValueError("SplitFed needs at least two sites per modality: one site's encoder is never averaged")
        if self.every < 2 or self.attacked_rounds < 1:
            raise ValueError("need every >= 2 (a round with steps after its first) and at least one attacked round")
        if self.cases < self.sites_per_modality * (self.num_val_cases + 1):
            raise ValueError(f"{self.cases} cases leave some cohort without a training case")

    @classmethod
    def quick(cls, seed: int = 0) -> SplitFedLeakageSettings:
        """Tiny sizes and budgets (tests, and a check of the pipeline): 40^3 phantoms, 32^3 crops of one, small
        widths, three iterations a round, one attacked round."""
        return cls(
            cases=8,
            shape=(40, 40, 40),
            batch_size=1,
            features=(8, 8, 16, 16, 16, 8),
            seed=seed,
            every=3,
            attacked_rounds=1,
            white_box_iterations=20,
            unsplit_iterations=4,
            timeout_s=900.0,
        )

    @property
    def num_iterations(self) -> int:
        """One round the server knows nothing in, then the attacked rounds, ending at an averaging."""
        return self.every * (1 + self.attacked_rounds)

    @property
    def captured_iterations(self) -> list[int]:
        """Every iteration of the attacked rounds (the local-step counts need them all)."""
        return list(range(self.every + 1, self.num_iterations + 1))

    def server_args(self) -> dict:
        """The workflow arguments the run overrides (the rest are the job's)."""
        return {
            "num_iterations": self.num_iterations,
            "encoder_averaging_every": self.every,
            "batch_size": self.batch_size,
            "crop_size": list(self.crop_size),
            "features": list(self.features),
            "learning_rate": self.learning_rate,
            "seed": self.seed,
            "val_every": self.num_iterations,
            "num_val_cases": self.num_val_cases,
            "log_every": self.every,
        }

    def to_dict(self) -> dict:
        """Plain JSON values."""
        content = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in content.items()}


def invert_activations(
    attack: str,
    observed: Mapping[int, torch.Tensor],
    known: Mapping[str, torch.Tensor] | None,
    crop_size: Sequence[int],
    features: Sequence[int],
    learning_rate: float,
    prior: torch.Tensor,
    settings: SplitFedLeakageSettings,
) -> tuple[torch.Tensor, dict]:
    """Reconstruct a site's crops from one level of its activations, as the server can.

    Args:
        attack: one of :data:`ROUND_START_ATTACKS` or :data:`ROUND_END_ATTACKS`.
        observed: ``{level: (B, features[level], ...)}`` as received, one level.
        known: the encoder state the attack uses: the average (``white_box``, ``white_box_stale``,
            ``unsplit_from_average``), the site's next upload (``white_box_next_upload``), ``None`` for ``unsplit``.
        crop_size: the crop size.
        features: the job's feature sizes.
        learning_rate: the sites' learning rate (the surrogate started from the average moves at it: the drift it has
            to follow is a few of their Adam steps).
        prior: ``(B, 1, D, H, W)`` mean auxiliary image (every inversion starts there; UnSplit's sign reference).
        settings: the budgets.

    Returns:
        ``(reconstruction (B, 1, D, H, W), stats)``.
    """
    if len(observed) != 1:
        raise ValueError(f"invert one level at a time, got levels {sorted(observed)}")
    level = next(iter(observed))
    if attack in ("white_box", "white_box_stale", "white_box_next_upload"):
        if known is None:
            raise ValueError(f"{attack} needs the encoder state the server knows")
        inversion = WhiteBoxInversion(
            features,
            known,
            iterations=settings.white_box_iterations,
            tv_weight=_TV_X0 if level == 0 else _TV_COARSE,
            seed=settings.seed,
            init="prior",
        )
        return inversion.reconstruct(observed, crop_size, prior=prior)
    if attack in ("unsplit_from_average", "unsplit"):
        from_average = attack == "unsplit_from_average"
        if from_average and known is None:
            raise ValueError("unsplit_from_average needs the average the server knows")
        inversion = UnSplit(
            features,
            outer_iterations=settings.unsplit_iterations,
            tv_weight=_UNSPLIT_TV_X0 if level == 0 else _UNSPLIT_TV_COARSE,
            init="reference",
            seed=settings.seed,
            **({"lr_model": learning_rate, "initial_state": known} if from_average else {}),
        )
        return inversion.reconstruct(observed, crop_size, reference=prior)
    raise ValueError(f"unknown attack {attack!r}; choose from {ROUND_START_ATTACKS + ROUND_END_ATTACKS}")


def _replay(known: Mapping[str, torch.Tensor], features, images: torch.Tensor, level: int, received) -> dict:
    """The average on the true crops against the activations received (they agree when the truth is right and the
    site ran the average)."""
    prefix = EncoderPrefix(build_encoder(features, known).eval(), [level])
    return replay_error(lambda crops: prefix(crops)[level], images, received)


def _scored(base: dict, reconstruction, truth, prior, seconds: float) -> dict:
    scores = image_leakage(reconstruction, truth, prior)
    per_crop = {key: scores[key] for key in PER_CROP_KEYS}
    return {**base, **scores["mean"], "per_crop": per_crop, "seconds": seconds}


def _known_encoder(view: SplitFedView, point: AttackPoint, attack: str, average) -> tuple[dict | None, int | None]:
    """The encoder state ``attack`` starts from, and the Adam steps between it and the encoder behind the
    activations (``None``: no state, the architecture alone)."""
    if attack == "unsplit":
        return None, None
    if attack == "white_box_next_upload":
        # The copy uploaded at the next averaging carries the step of these activations' own gradients.
        return view.upload(point.next_averaging, point.site), 1
    return average, point.local_steps


def _attack_point(
    view: SplitFedView, point: AttackPoint, truth: GroundTruth, aux: AuxiliaryImages, settings: SplitFedLeakageSettings
) -> tuple[list[dict], dict | None]:
    """Every attack on one site's activations of one iteration, scored; and the replay check at a round's start."""
    capture = view.run.capture(ACTIVATIONS, point.site, point.iteration)
    if not capture.plan:
        raise RuntimeError(f"capture {capture.path} carries no crop plan; it cannot be scored")
    model = view.run.model
    level = min(capture.observed)  # the finest level received: x0 when the job sends it, as its skip levels say
    observed = {level: capture.observed[level]}
    crop_size = capture.plan["size"]
    images = truth.image_crops(point.modality, capture.plan)
    prior = aux.prior(capture.plan)
    average = view.average_sent(point.averaging, point.site)
    replay = None
    if point.local_steps == 0:
        replay = _replay(average, model.features, images, level, observed[level])
        if not replay["matches"]:
            raise RuntimeError(
                f"the average sent to {point.site} at iteration {point.averaging}, on the true crops, does not give "
                f"the x{level} received at iteration {point.iteration} (max error {replay['max_abs_error']:.3g} > "
                f"{replay['tolerance']:.3g}): the truth or the server's view would be wrong"
            )
    attacks = ROUND_START_ATTACKS if point.local_steps == 0 else ROUND_END_ATTACKS
    base = {
        "site": point.site,
        "modality": point.modality,
        "averaging": point.averaging,
        "iteration": point.iteration,
        "local_steps": point.local_steps,
        "level": f"x{level}",
    }
    rows = []
    for attack in attacks:
        if attack == "white_box_next_upload" and point.next_averaging is None:
            continue  # the next averaging's copy was not captured
        known, steps_off = _known_encoder(view, point, attack, average)
        started = time.perf_counter()
        reconstruction, _ = invert_activations(
            attack, observed, known, crop_size, model.features, model.learning_rate, prior, settings
        )
        seconds = round(time.perf_counter() - started, 1)
        rows.append(_scored({**base, "attack": attack, "steps_off": steps_off}, reconstruction, images, prior, seconds))
    return rows, replay


def run_splitfed_leakage(out_dir: str | Path, settings: SplitFedLeakageSettings | None = None) -> dict:
    """Run the SplitFed job in the FLARE simulator with capture on, attack what its server held, write ``report.json``
    and ``report.md``.

    Args:
        out_dir: where the run (``run/``), the auxiliary phantom, ``report.json`` and ``report.md`` go.
        settings: sizes and budgets (default: two sites per modality, 48^3 phantoms, 32^3 crops, two attacked rounds).

    Returns:
        the report: settings, the run's summary, the server's view and the check of its averages, the replay checks,
        inversion rows (per site, iteration and attack), the pooled summary and verdicts
        (:func:`~splitunet.evaluation.leakage.splitfed_report.splitfed_summary`), seconds.
    """
    settings = settings or SplitFedLeakageSettings()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch_threads(settings.threads):
        report = _run(out_dir, settings)
    write_json_atomic(report, out_dir / "report.json")
    write_text_atomic(splitfed_markdown(report), out_dir / "report.md")
    return report


def _train(workspace: Path, settings: SplitFedLeakageSettings) -> dict:
    """The SplitFed job in the simulator, its server recording the attacked rounds and every averaging."""
    from splitunet.tools.splitfed_demo import SplitFedDemoSettings, run_splitfed_demo

    captured = settings.captured_iterations
    demo = SplitFedDemoSettings(
        sites_per_modality=settings.sites_per_modality,
        cases=settings.cases,
        shape=settings.shape,
        seed=settings.seed,
        server_args=settings.server_args(),
        timeout_s=settings.timeout_s,
        capture_iterations=captured,
        capture_weights=True,
        # Every site could encode at every captured iteration (a cohort's sites at most, in fact).
        max_captures=len(captured) * settings.sites_per_modality * len(MODALITIES) + 1,
    )
    return run_splitfed_demo(workspace, demo)


def _run(out_dir: Path, settings: SplitFedLeakageSettings) -> dict:
    started = time.perf_counter()
    workspace = out_dir / "run"
    summary = _train(workspace, settings)
    trained_s = time.perf_counter() - started
    run = CapturedRun(workspace)
    view = SplitFedView(run, settings.captured_iterations)
    points = view.attack_points()
    data_dir = workspace / "data"
    truth = GroundTruth(data_dir / "parties", read_or_create_secret(data_dir / "case_key_secret.txt"))
    aux_parties = auxiliary_phantom(data_dir, out_dir / "auxiliary")
    aux = {m: AuxiliaryImages(ModalityFolder(aux_parties / m, m, party="attacker")) for m in MODALITIES}
    report = {
        "settings": settings.to_dict(),
        "job": summary["job"],
        "run": {
            "iterations": summary["iterations"],
            "dice": summary["dice"],
            "cohorts": summary.get("cohorts"),
            "distance_to_average": {
                entry["iteration"]: entry["distance_to_average"]
                for entry in (summary.get("encoder_averaging") or {}).get("history", [])
            },
            "filters": run.server_results.get("filters"),
        },
        "server_view": describe_view(view, points),
        "averages": check_averages(view),
        "replay": {},
        "inversion": [],
    }
    for point in points:
        print(f"attacking {point.site} ({point.modality}) at iteration {point.iteration}", flush=True)
        rows, replay = _attack_point(view, point, truth, aux[point.modality], settings)
        report["inversion"] += rows
        if replay is not None:
            report["replay"][f"{point.site}@{point.iteration}"] = replay
    report["summary"] = splitfed_summary(report)
    report["training_s"] = round(trained_s, 1)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report
