"""``splitunet sweep``: train the demo configuration under each shipped defense, attack every site's captures at the
first, a middle and the last iteration, and tabulate what each defense costs (bytes; Dice from ``splitunet utility``)
against what it protects (attack SSIM over crops with intervals, label inference per site), plain and adaptive
attacks side by side.

All runs share the phantom cases, the case-key secret and the attacker's auxiliary cases, so differences are the
defenses' doing (up to the run-to-run variation of the random defenses: one run each). The sweep does not measure
Dice: after its short training Dice still swings by tens of points between seeds, so the Dice column comes from a
``splitunet utility`` study (300 iterations, paired seeds) when one is given (``--utility``), and is left empty
otherwise.

Presets (:data:`PRESETS`): ``quick`` checks the pipeline at a tiny size (tests); ``standard`` runs the nine settings
that cover every shipped defense once, at 80 iterations; ``full`` runs every defense at two strengths and the
protected preset at 300 iterations. Finished runs, reports and, within a report, each site's finished attacks are
reused, so a stopped sweep continues where it was.
The rows of an earlier summary (``--reuse``: its ``sweep.json``, same preset, attack budget and case keys) are
taken over without their runs, so a sweep continues on another machine; a row whose label inference predates the
current baselines is run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitunet.atomic_files import write_json_atomic, write_text_atomic
from splitunet.data.case_keys import read_or_create_secret
from splitunet.evaluation.leakage import AttackBudget, plot_tradeoff, run_leakage
from splitunet.evaluation.leakage.captured_run import CapturedRun
from splitunet.evaluation.leakage.report import auxiliary_phantom, refresh_label_inference
from splitunet.evaluation.sweep_report import label_summary, pool_inversions, sweep_markdown, tradeoff_points
from splitunet.networks.optimizer import OPTIMIZER_NAME, trained_by_this_optimizer
from splitunet.tools.demo import DemoSettings, run_demo
from splitunet.tools.deployment import find_job

__all__ = [
    "SweepSetting",
    "SweepPreset",
    "FULL_SWEEP",
    "STANDARD_SWEEP",
    "PRESETS",
    "FIRST_ATTACKS",
    "LATER_ATTACKS",
    "run_sweep",
    "seeded_secret",
    "sweep_markdown",
]

# At iteration 1 the attacker may know the encoders as initialised (the worst case the sweep assumes): every attack.
FIRST_ATTACKS = ("white_box", "unsplit", "learned_inverse", "substitute_encoder", "label_inference")
# Later the encoders have moved away from anything the server can rebuild: the attacks that need no site weights.
LATER_ATTACKS = ("unsplit", "substitute_encoder", "label_inference")


@dataclass(frozen=True)
class SweepSetting:
    """One run of the sweep: a shipped job, with filter or workflow arguments changed to set the strength.

    Args:
        label: row name.
        job: job name under ``jobs/``.
        filter_args: filter class name -> arguments to set (``copy_job_with_overrides``).
        server_args: workflow arguments to set (e.g. ``skip_levels`` to match blocked levels).
        client_args: site executor arguments to set (e.g. NoPeek's ``nopeek``).
    """

    label: str
    job: str
    filter_args: dict = field(default_factory=dict)
    server_args: dict = field(default_factory=dict)
    client_args: dict = field(default_factory=dict)

    def key(self) -> str:
        """What identifies the run across studies (``splitunet utility`` rows carry the same fields)."""
        fields = [self.job, self.filter_args, self.server_args]
        # Without client arguments the key stays what it was before they existed: earlier summaries still match.
        return json.dumps(fields + [self.client_args] if self.client_args else fields, sort_keys=True)

    @classmethod
    def from_row(cls, row: Mapping) -> SweepSetting:
        """The setting of a summary row (``sweep.json``, ``utility.json``)."""
        return cls(row["label"], row["job"], row["filter_args"], row["server_args"], row.get("client_args") or {})

    def to_row(self) -> dict:
        """The fields a summary row carries to identify the setting (:meth:`from_row`)."""
        row = {"label": self.label, "job": self.job, "filter_args": self.filter_args, "server_args": self.server_args}
        return {**row, "client_args": self.client_args} if self.client_args else row


# Every shipped defense at two strengths, then the protected preset.
FULL_SWEEP = (
    SweepSetting("no defense", "split_unet_fp32"),
    SweepSetting("activation noise σ 5e-4", "split_unet_noise"),
    SweepSetting("activation noise σ 2e-3", "split_unet_noise", {"ClippedGaussianNoise": {"noise_multiplier": 2e-3}}),
    SweepSetting("channel dropout 0.25", "split_unet_dropout"),
    SweepSetting("channel dropout 0.5", "split_unet_dropout", {"ChannelDropout": {"rate": 0.5}}),
    SweepSetting("top-k 10 %", "split_unet_topk"),
    SweepSetting("top-k 2 %", "split_unet_topk", {"TopKSparsify": {"fraction": 0.02}}),
    SweepSetting("int8 (the main job)", "split_unet"),
    SweepSetting("int2", "split_unet_int4", {"QuantizeFeatures": {"precision": "int2"}}),
    SweepSetting("x0 withheld", "split_unet_no_x0"),
    SweepSetting(
        "x0, x1 withheld", "split_unet_no_x0", {"BlockSkipLevels": {"levels": [0, 1]}}, {"skip_levels": [2, 3]}
    ),
    SweepSetting("gradient noise σ 5e-4", "split_unet_grad_noise"),
    SweepSetting(
        "gradient noise σ 5e-3", "split_unet_grad_noise", {"ClippedGaussianNoise": {"noise_multiplier": 5e-3}}
    ),
    SweepSetting("NoPeek 0.1", "split_unet_nopeek"),
    SweepSetting(
        "NoPeek 1", "split_unet_nopeek", client_args={"nopeek": {"weight": 1.0, "positions": 256, "levels": None}}
    ),
    SweepSetting("protected preset", "split_unet_protected"),
)

# Every shipped defense once, at the stronger strength where two are swept (the weaker ones did not hold).
STANDARD_SWEEP = tuple(
    setting
    for setting in FULL_SWEEP
    if setting.label
    in {
        "no defense",
        "activation noise σ 2e-3",
        "channel dropout 0.5",
        "top-k 10 %",
        "int8 (the main job)",
        "x0 withheld",
        "gradient noise σ 5e-3",
        "NoPeek 0.1",
        "protected preset",
    }
)


@dataclass(frozen=True)
class SweepPreset:
    """How long a sweep trains and attacks.

    Args:
        name: the preset's name (``--preset``).
        settings: the runs.
        iterations: training iterations per run; the attacks run at 1, ``iterations // 2`` and ``iterations``.
        budget: :class:`AttackBudget` factory name (``"sweep"``, ``"quick"``).
        demo: :class:`DemoSettings` fields set over the demo's (size of the phantom).
        server_args: workflow arguments set over every job's (model size of ``quick``).
    """

    name: str
    settings: tuple[SweepSetting, ...]
    iterations: int
    budget: str = "sweep"
    demo: Mapping = field(default_factory=dict)
    server_args: Mapping = field(default_factory=dict)

    def attack_iterations(self) -> tuple[int, ...]:
        """The iterations attacked: the first, the middle and the last (without repeats)."""
        return tuple(dict.fromkeys((1, max(1, self.iterations // 2), self.iterations)))

    def capture_iterations(self) -> tuple[int, ...]:
        """Captured iterations: each attacked one and, for label inference, the next (which carries its gradients),
        except after the last."""
        captured = []
        for iteration in self.attack_iterations():
            captured += [iteration, iteration + 1] if iteration < self.iterations else [iteration]
        return tuple(sorted(set(captured)))

    def attack_budget(self) -> AttackBudget:
        return getattr(AttackBudget, self.budget)()


PRESETS = {
    # A tiny configuration (seconds a run): it checks the pipeline; its figures mean little.
    "quick": SweepPreset(
        "quick",
        (FULL_SWEEP[0],),
        iterations=4,
        budget="quick",
        demo={"cases": 6, "shape": (40, 40, 40)},
        server_args={"crop_size": [32, 32, 32], "features": [4, 8, 8, 16, 16, 4], "num_val_cases": 2},
    ),
    "standard": SweepPreset("standard", STANDARD_SWEEP, iterations=80),
    "full": SweepPreset("full", FULL_SWEEP, iterations=300),
}


def _trained(run_dir: Path, iterations: int) -> dict | None:
    results = run_dir / "results.json"
    if not results.is_file():
        return None
    summary = json.loads(results.read_text())
    return summary if summary.get("iterations") == iterations and trained_by_this_optimizer(summary) else None


def _labels_stale(report: Mapping) -> bool:
    return any(
        labels and "dice_own_image" in labels and "gain_variant" not in labels
        for labels in (report.get("label_inference_by_site") or {}).values()
    )


def _leakage(run_dir: Path, iteration: int, attacks: Sequence[str], budget: AttackBudget, data_dir, aux) -> dict:
    out = run_dir / f"leakage_{iteration:06d}"
    done = out / "report.json"
    if done.is_file():
        report = json.loads(done.read_text())
        if report.get("budget") == budget.to_dict() and report.get("attacks") == list(attacks):
            if _labels_stale(report):
                # Made before each attack got its own-image baseline: re-score the labels only (seconds).
                print(f"re-scoring the label inference of {done}", flush=True)
                report = refresh_label_inference(out, data_dir)
            print(f"reusing {done}", flush=True)
            return report
    sites = list(CapturedRun(run_dir).sites)
    # The worst case the sweep judges each defense against: a server that knows the sites' initial encoders.
    return run_leakage(
        run_dir,
        out,
        attacks=attacks,
        sites=sites,
        iteration=iteration,
        budget=budget,
        data_dir=data_dir,
        aux_dir=aux,
        assume_known_init=True,
        # One site's reconstruction grids at the first iteration show what the tables cannot; more would only cost.
        figure_sites=sites[:1] if iteration == 1 else (),
    )


def seeded_secret(data_dir: Path, seed: int, study: str = "sweep") -> str:
    """The phantom's case-key secret, derived from the seed when a study creates its data, and its fingerprint.

    A study plays both sides, so its secret protects nothing; derived from the seed, it keys the same cases into
    the same split and crops on any machine, which lets a study continue elsewhere from its summary (``--reuse``).

    Args:
        data_dir: the study's data folder (the secret file goes there, if it is not there yet).
        seed: the study's seed.
        study: which study: ``"sweep"`` or ``"utility"`` (each derives its own secrets).
    """
    secret_file = Path(data_dir) / "case_key_secret.txt"
    if not secret_file.is_file():
        derived = hashlib.sha256(f"splitunet-{study}/{seed}".encode()).hexdigest()[:32]
        write_text_atomic(derived, secret_file, mode=0o600)
    secret = read_or_create_secret(secret_file)
    return hashlib.sha256(f"{secret}/fingerprint".encode()).hexdigest()[:16]


def _reusable_rows(
    reuse: str | Path | None, preset: SweepPreset, budget: AttackBudget, data_fingerprint: str
) -> dict[str, Mapping]:
    """The rows of an earlier ``sweep.json`` made with the same preset, attack budget and case keys, by setting
    key."""
    if not reuse:
        return {}
    earlier = json.loads(Path(reuse).read_text())
    if earlier.get("preset") != preset.name or earlier.get("budget") != budget.to_dict():
        raise ValueError(
            f"{reuse} was made with preset {earlier.get('preset')!r} and budget {earlier.get('budget')}; "
            f"this sweep runs {preset.name!r} with {budget.to_dict()}: its rows cannot be reused"
        )
    if earlier.get("data_fingerprint") != data_fingerprint:
        raise ValueError(
            f"{reuse} keyed its cases with another secret (fingerprint {earlier.get('data_fingerprint')}, this "
            f"sweep's {data_fingerprint}): its crops are not this sweep's, its rows cannot be reused"
        )
    if earlier.get("optimizer") != OPTIMIZER_NAME:
        raise ValueError(
            f"{reuse} was trained with optimiser {earlier.get('optimizer', 'Adam, coupled weight decay')!r}, this "
            f"sweep with {OPTIMIZER_NAME!r}: its rows cannot be reused"
        )
    return {SweepSetting.from_row(row).key(): row for row in earlier["rows"]}


def _labels_summary_stale(row: Mapping) -> bool:
    """True when a summary row's label inference was scored before each attack had its own-image baseline."""
    return any(
        "attack" not in entry
        for attacked in row["attacks"].values()
        for entry in (attacked.get("labels") or {}).get("by_site", {}).values()
    )


def _utility_rows(utility: str | Path | None) -> dict[str, Mapping]:
    if not utility:
        return {}
    report = json.loads(Path(utility).read_text())
    return {SweepSetting.from_row(row).key(): row for row in report["rows"]}


def run_sweep(
    out_dir: str | Path,
    preset: SweepPreset | str = "standard",
    utility: str | Path | None = None,
    seed: int = 0,
    reuse: str | Path | None = None,
) -> dict:
    """Train, capture and attack each setting of a preset; write ``sweep.json``, ``sweep.md`` (and, with Dice from
    ``utility``, ``tradeoff.png``).

    Args:
        out_dir: the sweep's folder (data, one workspace and leakage report per run and attacked iteration).
        preset: a :class:`SweepPreset` or a name of :data:`PRESETS`.
        utility: a ``splitunet utility`` report (``utility.json``) whose Dice changes fill the Dice column of the
            settings it measured.
        seed: phantom and training seed.
        reuse: an earlier ``sweep.json`` of the same preset, budget and case keys whose rows are taken over (run
            again where their labels predate the current baselines).

    Returns:
        the summary written to ``sweep.json``.
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    data_dir = out_dir / "data"
    budget = preset.attack_budget()
    utility_rows = _utility_rows(utility)
    data_fingerprint = seeded_secret(data_dir, seed)
    reusable = _reusable_rows(reuse, preset, budget, data_fingerprint)
    summary = {
        "preset": preset.name,
        "iterations": preset.iterations,
        "attack_iterations": list(preset.attack_iterations()),
        "budget": budget.to_dict(),
        "threads": torch.get_num_threads(),
        "utility": str(utility) if utility else None,
        "data_fingerprint": data_fingerprint,
        "optimizer": OPTIMIZER_NAME,
        "rows": [],
    }
    for index, setting in enumerate(preset.settings):
        print(f"\n=== sweep {index + 1}/{len(preset.settings)}: {setting.label} ({setting.job}) ===", flush=True)
        run_dir = out_dir / f"run_{index:02d}_{setting.job}"
        reused = reusable.get(setting.key())
        if reused is not None and not _labels_summary_stale(reused):
            print(f"reusing the row of {reuse}", flush=True)
            summary["rows"].append({**reused, "utility": utility_rows.get(setting.key())})
            write_json_atomic(summary, out_dir / "sweep.json")
            continue
        if reused is not None:
            # Its captures are gone and a rerun cannot give them again (each site draws its encoder privately).
            print(f"the row of {reuse} scored labels before the per-attack baselines: running it again", flush=True)
        run_started = time.perf_counter()
        trained = _trained(run_dir, preset.iterations)
        if trained is None:
            trained = run_demo(
                run_dir,
                DemoSettings(
                    seed=seed,
                    server_args={
                        **preset.server_args,
                        "num_iterations": preset.iterations,
                        "val_every": preset.iterations,
                        **setting.server_args,
                    },
                    filter_args=setting.filter_args,
                    client_args=setting.client_args,
                    capture_iterations=preset.capture_iterations(),
                    **preset.demo,
                ),
                job_dir=find_job(setting.job),
                data_dir=data_dir,
            )
        train_s = time.perf_counter() - run_started
        aux = auxiliary_phantom(data_dir, out_dir / "auxiliary")
        attacks, attack_s = {}, 0.0
        for iteration in preset.attack_iterations():
            attack_started = time.perf_counter()
            chosen = FIRST_ATTACKS if iteration == 1 else LATER_ATTACKS
            report = _leakage(run_dir, iteration, chosen, budget, data_dir, aux)
            attack_s += time.perf_counter() - attack_started
            attacks[str(iteration)] = {
                "inversion": pool_inversions(report),
                "labels": label_summary(report),
                "report": str((run_dir / f"leakage_{iteration:06d}" / "report.md").relative_to(out_dir)),
            }
        model = CapturedRun(run_dir).model
        summary["rows"].append(
            {
                **setting.to_row(),
                "train_encoders": model.train_encoders,
                "activation_bytes_per_iteration": trained.get("activation_bytes_per_iteration"),
                "utility": utility_rows.get(setting.key()),
                "attacks": attacks,
                "train_s": round(train_s, 1),
                "attack_s": round(attack_s, 1),
            }
        )
        write_json_atomic(summary, out_dir / "sweep.json")
    points = tradeoff_points(summary["rows"], str(preset.attack_iterations()[0]))
    if points:
        plot_tradeoff(points, out_dir / "tradeoff.png", "Mean Dice (utility study) against the best attack's SSIM")
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(summary, out_dir / "sweep.json")
    (out_dir / "sweep.md").write_text(sweep_markdown(summary))
    return summary
