"""``splitunet leakage``: attack what a run captured, score it against the truth, write report.json/.md and figures."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from splitunet.atomic_files import write_json_atomic
from splitunet.data.case_keys import read_or_create_secret
from splitunet.data.partition import partition_msd
from splitunet.data.party_data import ModalityFolder
from splitunet.data.party_settings import SETTINGS_FILE_NAME, load_site_settings
from splitunet.data.phantom import generate_phantom
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.attacks import build_encoder, defense_from_trail
from splitunet.evaluation.leakage.active_attackers import malicious_server_section, tracking_section
from splitunet.evaluation.leakage.attack_suite import (
    ADAPTIVE_SUFFIX,
    INVERSION_ATTACKS,
    AttackBudget,
    infer_labels,
    invert_capture,
)
from splitunet.evaluation.leakage.captured_run import ACTIVATIONS, GRADIENTS, CapturedRun
from splitunet.evaluation.leakage.figures import plot_reconstruction_grid
from splitunet.evaluation.leakage.ground_truth import AuxiliaryImages, GroundTruth
from splitunet.wire.protocol import MODALITIES

__all__ = [
    "ATTACK_CHOICES",
    "run_leakage",
    "leakage_markdown",
    "auxiliary_phantom",
    "refresh_label_inference",
    "best_inversion",
    "attacker_encoder_seed",
]

# Attacks over many iterations (splitunet.evaluation.leakage.active_attackers), after the per-capture ones.
ACTIVE_ATTACKS = ("encoder_tracking", "malicious_server")
ATTACK_CHOICES = (*INVERSION_ATTACKS, "label_inference", *ACTIVE_ATTACKS)
# What the attacker's encoder is when a site keeps a private seed and the worst case is not assumed.
WRONG_GUESS = "the site's encoder_seed is private; the attacker rebuilds from the job's seed (a wrong guess)"
# Auxiliary phantom cases are drawn with this seed offset, so they are never the sites' cases.
_AUX_SEED_OFFSET = 1000
_AUX_CASES = 6


def auxiliary_phantom(data_dir: Path, out_dir: Path) -> Path:
    """Parties folder of auxiliary phantom cases like the run's (same shape), drawn from another seed.

    The attacker's "public" scans of the modality: made once per output folder and reused.
    """
    index_path = data_dir / "phantom_msd" / "dataset.json"
    if not index_path.is_file():
        raise SplitUNetConfigError(
            f"{index_path} not found: the run's data is not a phantom, so give auxiliary cases with --aux"
        )
    phantom = json.loads(index_path.read_text())["phantom"]
    parties = out_dir / "parties"
    if not (parties / MODALITIES[0]).is_dir():
        generate_phantom(out_dir / "msd", _AUX_CASES, tuple(phantom["shape"]), phantom["seed"] + _AUX_SEED_OFFSET)
        partition_msd(out_dir / "msd", parties, progress=False)
    return parties


def best_inversion(rows: Sequence[Mapping]) -> Mapping | None:
    """The inversion row with the highest SSIM (the leak a defense must be judged by), or None.

    Plain and adaptive attacks (``white_box`` and ``white_box_adaptive``, ...) compete alike: the defense is judged
    by the stronger.
    """
    scored = [row for row in rows if math.isfinite(row.get("ssim", math.nan))]
    return max(scored, key=lambda row: row["ssim"]) if scored else None


def _defenses_seen(trail: Sequence[Mapping]) -> list[str]:
    return sorted({entry["filter"] for entry in trail if entry.get("filter") not in (None, "FeatureGuard")})


def attacker_encoder_seed(run: CapturedRun, site: str, assume_known_init: bool) -> tuple[int, str]:
    """The seed the attacker initialises its copy of ``site``'s encoder from, and what that assumes.

    The server knows the job's model settings, so it can always rebuild an encoder seeded from them
    (``config.seed + 1 + modality index``, as a site without a seed of its own does). A site with a private
    ``encoder_seed`` in its ``local/`` settings starts elsewhere; only ``assume_known_init`` (the worst case: the
    seed leaked, or the site kept the default) hands the attacker that seed, read from the run's workspace.
    """
    modality = run.sites[site]
    job_seed = run.model.seed + 1 + MODALITIES.index(modality)
    private = None
    for settings_dir in (run.workspace / "simulator" / "local", run.workspace / "local"):
        if (settings_dir / SETTINGS_FILE_NAME).is_file():
            private = load_site_settings(site, settings_dir).encoder_seed
            break
    if private is None:
        return job_seed, "the site initialised its encoder from the job's seed, which the server knows"
    if assume_known_init:
        return private, "assumed known: the site's private encoder_seed (--assume-known-init)"
    return job_seed, WRONG_GUESS


def site_label_inference(run: CapturedRun, site: str, iteration: int, truth: GroundTruth) -> dict | None:
    """``site``'s label inference from the gradients of ``iteration``'s features, scored against the truth and the
    site's own crops; ``None`` without a gradient capture for it."""
    # The gradients for iteration t's features travel with the request of iteration t + 1.
    if iteration + 1 not in run.iterations(GRADIENTS, site):
        return None
    plan = run.capture(ACTIVATIONS, site, iteration).plan
    modality = run.sites[site]
    gradients = run.capture(GRADIENTS, site, iteration + 1)
    own = truth.image_crops(modality, plan)
    defense = defense_from_trail(gradients.filter_trail)
    return infer_labels(gradients.observed, plan["size"], truth.region_crops(plan, "WT"), own, modality, defense)


def _attack_site(
    run: CapturedRun,
    site: str,
    iteration: int,
    truth: GroundTruth,
    aux_parties: Path,
    attacks: Sequence[str],
    budget: AttackBudget,
    out_dir: Path,
    assume_known_init: bool = False,
    figures: bool = True,
) -> dict:
    modality = run.sites[site]
    capture = run.capture(ACTIVATIONS, site, iteration)
    plan = capture.plan
    if not plan:
        raise SplitUNetConfigError(f"capture {capture.path} carries no crop plan; it cannot be scored")
    size = plan["size"]
    original = truth.image_crops(modality, plan)
    aux = AuxiliaryImages(ModalityFolder(aux_parties / modality, modality, party="attacker"))
    prior = aux.prior(plan)
    notes = []
    inversion = [name for name in attacks if name in INVERSION_ATTACKS]
    if iteration != 1 and "white_box" in inversion:
        # The server can rebuild a site's encoder only as initialised; later weights stay at the site.
        inversion.remove("white_box")
        notes.append(f"white-box skipped: it needs the encoder of iteration {iteration}, which only the site holds")
    seed, initialisation = attacker_encoder_seed(run, site, assume_known_init)
    if "white_box" in inversion:
        notes.append(f"white-box encoder: {initialisation}")
    encoder = build_encoder(run.model.features, seed=seed).eval()
    aux_crops = aux.random_crops(budget.learned_crops, size, seed=budget.seed)
    defense = defense_from_trail(capture.filter_trail)
    rows, images = invert_capture(
        capture.observed, size, encoder, original, prior, aux_crops, budget, inversion, defense
    )
    written = {}
    for attack in dict.fromkeys(name for name, _ in images) if figures else ():
        mine = {level: image[:1] for (name, level), image in images.items() if name == attack}
        if mine:
            path = out_dir / f"{site}_{attack}.png"
            title = f"{site} ({modality}), iteration {iteration}: {attack} per received level, first crop of the batch"
            plot_reconstruction_grid(original[0], mine, path, title)
            written[attack] = path.name
    labels = None
    if "label_inference" in attacks:
        labels = site_label_inference(run, site, iteration, truth)
        if labels is None:
            if not run.model.train_encoders:
                notes.append("label inference: the job sends no gradients, so a site has only its own image")
            else:
                notes.append(f"label inference skipped: no gradient capture of iteration {iteration + 1}")
    return {
        "modality": modality,
        "encoder_initialisation": initialisation,
        "levels_received": [f"x{level}" for level in sorted(capture.observed)],
        "defenses_on_the_way": _defenses_seen(capture.filter_trail),
        "defense_model": defense.describe(),
        "crops": len(original),
        "inversion": rows,
        "best_inversion": best_inversion(rows),
        "label_inference": labels,
        "figures": written,
        "notes": notes,
    }


def run_leakage(
    workspace: str | Path,
    out_dir: str | Path,
    attacks: Sequence[str] = ATTACK_CHOICES,
    sites: Sequence[str] | None = None,
    iteration: int = 1,
    budget: AttackBudget | None = None,
    data_dir: str | Path | None = None,
    aux_dir: str | Path | None = None,
    assume_known_init: bool = False,
    figure_sites: Sequence[str] | None = None,
) -> dict:
    """Attack a run's captures and write ``report.json``, ``report.md`` and one PNG grid per site and attack.

    Args:
        workspace: a ``splitunet demo --capture ...`` workspace.
        out_dir: where the report goes.
        attacks: from :data:`ATTACK_CHOICES`.
        sites: sites to attack (default: the first, FLAIR in the demo).
        iteration: the captured training iteration to attack (1: the encoders are still as initialised).
        budget: attack lengths.
        data_dir: the run's data (``parties/`` and ``case_key_secret.txt``); default ``<workspace>/data``.
        aux_dir: parties folder of the attacker's auxiliary cases; default: phantom cases made for the purpose.
        assume_known_init: the worst case for the white-box attack: the attacker knows each site's initial
            encoder (its private ``encoder_seed``). Off by default, as sites keep that seed (see
            :func:`attacker_encoder_seed`).
        figure_sites: the sites whose PNG grids are drawn (default: every attacked site; a sweep that attacks
            many runs keeps one site's).

    Returns:
        the report written to ``report.json``.
    """
    started = time.perf_counter()
    unknown = sorted(set(attacks) - set(ATTACK_CHOICES))
    if unknown:
        raise SplitUNetConfigError(f"unknown attacks {unknown}; choose from {list(ATTACK_CHOICES)}")
    budget = budget or AttackBudget()
    run = CapturedRun(workspace)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir).resolve() if data_dir else run.workspace / "data"
    secret_file = data_dir / "case_key_secret.txt"
    if not secret_file.is_file():
        raise SplitUNetConfigError(f"{secret_file} not found: give the run's data folder with --data")
    truth = GroundTruth(data_dir / "parties", read_or_create_secret(secret_file))
    aux_parties = Path(aux_dir) if aux_dir else auxiliary_phantom(data_dir, out_dir / "auxiliary")
    chosen = list(sites) if sites else [next(iter(run.sites))]
    report = {
        "workspace": str(run.workspace),
        "job": run.job,
        "iteration": iteration,
        "attacks": list(attacks),
        "assume_known_init": bool(assume_known_init),
        "budget": budget.to_dict(),
        "threads": torch.get_num_threads(),
        "modalities": dict(run.sites),
        "sites": {},
    }
    # Each site's attacks are kept as they finish, so a report stopped part-way resumes at the next site: a sweep's
    # site takes minutes to hours on CPU. Every attack seeds itself, so a site's figures do not depend on the others.
    identity = {key: report[key] for key in ("workspace", "iteration", "attacks", "assume_known_init", "budget")}
    for site in chosen:
        figures = figure_sites is None or site in figure_sites
        finished = _finished_site(out_dir, site, {**identity, "figures": figures})
        if finished is not None:
            print(f"reusing the finished attacks on {site} at iteration {iteration}", flush=True)
            report["sites"][site] = finished
            continue
        print(f"attacking {site} ({run.sites.get(site)}) at iteration {iteration}", flush=True)
        report["sites"][site] = _attack_site(
            run,
            site,
            iteration,
            truth,
            aux_parties,
            attacks,
            budget,
            out_dir,
            assume_known_init,
            figures=figures,
        )
        write_json_atomic(
            {"identity": {**identity, "figures": figures}, "site": report["sites"][site]}, _partial_file(out_dir, site)
        )
    if "label_inference" in attacks:
        # Cheap (no optimisation): every site that received gradients, each against its own image.
        report["label_inference_by_site"] = {
            site: (report["sites"][site]["label_inference"] if site in report["sites"] else None)
            or site_label_inference(run, site, iteration, truth)
            for site in run.sites
        }
    first = chosen[0]
    aux = AuxiliaryImages(ModalityFolder(aux_parties / run.sites[first], run.sites[first], party="attacker"))
    if "encoder_tracking" in attacks:
        report["encoder_tracking"] = _tracking(run, first, truth, aux, budget, assume_known_init)
    if "malicious_server" in attacks and budget.malicious_iterations:
        report["malicious_server"] = _malicious_server(run, first, truth, aux, budget)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(report, out_dir / "report.json")
    (out_dir / "report.md").write_text(leakage_markdown(report))
    shutil.rmtree(out_dir / _PARTIAL_DIR, ignore_errors=True)  # report.json holds every site now
    return report


_PARTIAL_DIR = "finished_sites"


def _partial_file(out_dir: Path, site: str) -> Path:
    return out_dir / _PARTIAL_DIR / f"{site}.json"


def _finished_site(out_dir: Path, site: str, identity: Mapping) -> dict | None:
    """A site's attacks kept by an earlier, interrupted call with the same run, iteration, attacks and budget."""
    path = _partial_file(out_dir, site)
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
    except ValueError:
        return None  # written atomically, so only a foreign file: attack again
    return kept["site"] if kept.get("identity") == json.loads(json.dumps(identity)) else None


def refresh_label_inference(report_dir: str | Path, data_dir: str | Path | None = None) -> dict:
    """Re-score the label inference of a finished leakage report with the current baselines, keeping every image
    attack as it was, and rewrite ``report.json`` and ``report.md``.

    Label inference needs no optimisation (seconds a site), so a report made before a change of its baselines is
    brought up to date without re-running the inversions.

    Args:
        report_dir: the folder of ``report.json``; its ``workspace`` must still hold the run's captures.
        data_dir: the run's data folder (default ``<workspace>/data``).

    Returns:
        The updated report.
    """
    report_dir = Path(report_dir)
    report = json.loads((report_dir / "report.json").read_text())
    if "label_inference" not in report["attacks"]:
        return report
    run = CapturedRun(report["workspace"])
    data_dir = Path(data_dir) if data_dir else run.workspace / "data"
    truth = GroundTruth(data_dir / "parties", read_or_create_secret(data_dir / "case_key_secret.txt"))
    iteration = report["iteration"]
    by_site = {site: site_label_inference(run, site, iteration, truth) for site in run.sites}
    for site, result in report["sites"].items():
        if result.get("label_inference") is not None:
            result["label_inference"] = by_site[site]
    report["label_inference_by_site"] = by_site
    write_json_atomic(report, report_dir / "report.json")
    (report_dir / "report.md").write_text(leakage_markdown(report))
    return report


def _tracking(
    run: CapturedRun, site: str, truth: GroundTruth, aux: AuxiliaryImages, budget: AttackBudget, known: bool
) -> dict:
    seed, initialisation = attacker_encoder_seed(run, site, known)
    if initialisation == WRONG_GUESS:
        return {"site": site, "skipped": "needs the site's initial encoder, which is private (--assume-known-init)"}
    if not run.model.train_encoders:
        return {"site": site, "skipped": "the job freezes the encoders: the initial encoder is the encoder throughout"}
    print(f"encoder tracking of {site}", flush=True)
    section = tracking_section(run, site, seed, truth, aux, budget.tracking_iterations)
    if section is None:
        return {"site": site, "skipped": "needs captures of consecutive iterations from 1 (--capture 1 2 3 ...)"}
    return section


def _malicious_server(run: CapturedRun, site: str, truth: GroundTruth, aux: AuxiliaryImages, budget: AttackBudget):
    if not run.model.train_encoders:
        # Simulated anyway, it would describe another job: these sites refuse any gradient.
        return {"site": site, "skipped": "the job sends no gradients and its sites refuse any (train_encoders false)"}
    print(f"simulated malicious server against {site} ({budget.malicious_iterations} iterations)", flush=True)
    modalities = list(run.sites.values())
    size = run.capture(ACTIVATIONS, site, run.iterations(ACTIVATIONS, site)[0]).plan["size"]
    section = malicious_server_section(
        truth,
        aux,
        modalities,
        list(run.sites).index(site),
        run.model,
        size,
        budget.malicious_iterations,
        budget.honest_seeds,
        budget.malicious_crops,
        budget.seed,
    )
    return {"site": site, **section}


def _active_markdown(report: Mapping) -> list[str]:
    lines = []
    tracking = report.get("encoder_tracking")
    if tracking:
        lines += ["## Encoder tracking", ""]
        if "skipped" in tracking:
            lines += [f"Skipped for {tracking['site']}: {tracking['skipped']}.", ""]
        else:
            lines += [
                f"A server that knows {tracking['site']}'s initial encoder replays its training from the gradients it "
                f"sent and inverts {tracking['level']} of each captured iteration with the tracked weights, against "
                "an attacker that keeps the initial weights.",
                "",
                "| iteration | SSIM, tracked weights | SSIM, initial weights | prior |",
                "|---|---|---|---|",
            ]
            for row in tracking["rows"]:
                lines.append(
                    f"| {row['iteration']} | {_fmt(row.get('ssim'))} | {_fmt(row.get('ssim_untracked'))} | "
                    f"{_fmt(row.get('ssim_prior'))} |"
                )
            lines.append("")
    malicious = report.get("malicious_server")
    if malicious:
        lines += ["## Malicious server (feature-space hijacking, simulated)", ""]
        if "skipped" in malicious:
            lines += [f"Skipped for {malicious['site']}: {malicious['skipped']}.", ""]
        else:
            detection, alarms = malicious["detection"], malicious["false_alarms"]
            lines += [
                f"The server sends {malicious['site']} ({malicious['modality']}) the hijacking gradients instead of "
                f"honest ones, in-process on the run's data ({malicious['crop_size']} crops). The site-side "
                f"GradientDetector flagged {detection['flagged']}/{detection['tested']} hijacking iterations (first "
                f"at iteration {detection['first_flag']}) and {alarms['flagged']}/{alarms['tested']} iterations of "
                f"{len(alarms['runs'])} honest run(s). With the detector the site applies nothing after the first "
                "flag, so its curve stops there.",
                "",
                "| iteration | SSIM without detector | SSIM with detector | prior |",
                "|---|---|---|---|",
            ]
            for row in malicious["curve"]:
                lines.append(
                    f"| {row['iteration']} | {_fmt(row['ssim_no_detector'])} | {_fmt(row['ssim_with_detector'])} | "
                    f"{_fmt(row['ssim_prior'])} |"
                )
            lines.append("")
            lines += _detector_statistics_table(malicious)
    return lines


def _detector_statistics_table(malicious: Mapping) -> list[str]:
    """The hijacker's statistics next to the honest runs' and the bounds: how much room each test had."""
    attack = (malicious.get("detection") or {}).get("statistics") or {}
    honest = [run.get("statistics") or {} for run in malicious["false_alarms"]["runs"]]
    bounds = malicious.get("bounds")
    if not attack.get("level_ratio") or not bounds:
        return []  # a report written before the statistics were kept

    def honest_extreme(name: str, key: str, stat: str, pick):
        values = [run[name][key][stat] for run in honest if key in run.get(name, {})]
        return pick(values) if values else None

    lines = [
        "The detector's statistics over the hijacker's answers and the honest runs above, against its bounds "
        "(level ratio: log10 of the level's gradient RMS over x4's; DC share: the share of the level's gradient "
        "energy in its per-channel means).",
        "",
        "| level | hijacker ratio min / median / max | honest ratio min | ratio bound | hijacker DC share min / median "
        "| honest DC share max | DC bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(set(attack["level_ratio"]) | set(attack.get("dc_fraction", {}))):
        ratio = attack["level_ratio"].get(key)
        dc = attack.get("dc_fraction", {}).get(key, {})
        low = (bounds["level_ratio"].get(key) or [None, None])[0]
        dc_bound = bounds["max_dc_fraction"].get(key)
        ratio_cell = "-" if ratio is None else f"{ratio['min']:.2f} / {ratio['median']:.2f} / {ratio['max']:.2f}"
        lines.append(
            f"| {key} | {ratio_cell} | {_fmt(honest_extreme('level_ratio', key, 'min', min))} | "
            f"{'-' if low is None else f'>= {low:g}'} | {_fmt(dc.get('min'))} / {_fmt(dc.get('median'))} | "
            f"{_fmt(honest_extreme('dc_fraction', key, 'max', max), 4)} | {'-' if dc_bound is None else dc_bound} |"
        )
    return [*lines, ""]


def _adaptive_table(result: Mapping) -> list[str]:
    """Plain attack next to its adaptive variant (same level), under the defense the trail describes."""
    found = {(row["attack"], row["level"]): row for row in result["inversion"]}
    pairs = [
        (row, found[(row["attack"] + ADAPTIVE_SUFFIX, row["level"])])
        for row in result["inversion"]
        if (row["attack"] + ADAPTIVE_SUFFIX, row["level"]) in found
    ]
    if not pairs:
        return []
    defense = "; ".join(result.get("defense_model") or []) or "none modelled"
    lines = [
        "",
        f"Plain attacks next to the attacks adapted to the defense read from the filter trail ({defense}): SSIM, "
        "and the reported leak max(SSIM, prior).",
        "",
        "| attack | level | SSIM plain | SSIM adaptive | reported plain | reported adaptive | adaptive - plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for plain, adaptive in pairs:
        lines.append(
            f"| {plain['attack']} | {plain['level']} | {_fmt(plain['ssim'])} | {_fmt(adaptive['ssim'])} | "
            f"{_fmt(plain.get('ssim_reported'))} | {_fmt(adaptive.get('ssim_reported'))} | "
            f"{adaptive['ssim'] - plain['ssim']:+.3f} |"
        )
    return lines


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def leakage_markdown(report: Mapping) -> str:
    """Human-readable ``report.md``: one table of inversions per site, then label inference."""
    lines = [
        f"# Leakage of `{report['job']}` at iteration {report['iteration']}",
        "",
        "Attacker's assumption about the sites' initial encoders: "
        + ("known (worst case, `--assume-known-init`)." if report.get("assume_known_init") else "not known."),
        "",
        "SSIM and PSNR of each reconstruction against the crop the site encoded (after the least-squares intensity "
        "fit the metrics allow); the prior is the mean auxiliary image at the same place. An attack below the prior "
        "has failed, not been stopped, so the leak reported is max(SSIM, prior). Relative leakage = "
        "(SSIM - SSIM prior) / SSIM prior.",
        "",
    ]
    for site, result in report["sites"].items():
        lines += [
            f"## {site} ({result['modality']})",
            "",
            f"Levels received: {', '.join(result['levels_received'])}; defenses on the way: "
            f"{', '.join(result['defenses_on_the_way']) or 'none'}; {result['crops']} crop(s).",
            "",
            "| attack | level | SSIM | PSNR dB | SSIM prior | PSNR prior dB | relative leakage | SSIM in brain (prior) "
            "| reported: max(SSIM, prior) | s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["inversion"]:
            lines.append(
                f"| {row['attack']} | {row['level']} | {_fmt(row['ssim'])} | {_fmt(row['psnr'], 1)} | "
                f"{_fmt(row['ssim_prior'])} | {_fmt(row['psnr_prior'], 1)} | {_fmt(row['relative_leakage'], 2)} | "
                f"{_fmt(row.get('ssim_brain'))} ({_fmt(row.get('ssim_prior_brain'))}) | "
                f"{_fmt(row.get('ssim_reported'))} | {row['seconds']:.0f} |"
            )
        lines += _adaptive_table(result)
        labels = result.get("label_inference")
        if labels:
            lines += [
                "",
                f"Label inference from the gradients of {labels['level']} (norm, Otsu): whole-tumour Dice "
                f"{_fmt(labels['dice'])} (AUC {_fmt(labels.get('auc'))}), {labels['fraction_marked']:.1%} of voxels "
                f"marked. Without any gradient: the same number of the site's own most tumour-like voxels "
                f"{_fmt(labels.get('dice_own_image'))} (AUC {_fmt(labels.get('auc_own_image'))}; best single "
                f"threshold, an oracle: {_fmt(labels.get('dice_own_image_best_threshold'))}); a random mask "
                f"{_fmt(labels['dice_random_mask'])}. Gain of the gradients over the own image (the best of the "
                f"plain, smoothed and adaptive attacks, each against as many of the image's voxels as it marks): "
                f"{_fmt(labels.get('gain_over_own_image'))} ({labels.get('gain_variant', '-')}).",
            ]
            if "dice_adaptive" in labels:
                candidates = ", ".join(
                    f"{name} {_fmt(dice)}" for name, dice in labels.get("dice_adaptive_candidates", {}).items()
                )
                lines.append(
                    f"Adaptive label attack (squared norm smoothed by sigma {labels['adaptive_smoothing_sigma']:.2f} "
                    f"voxels, set from the gradient noise in the filter trail): Dice {_fmt(labels['dice_adaptive'])} "
                    f"with the attacker's rule ({labels['adaptive_chosen']}); per threshold {candidates}; best of "
                    f"them (an oracle, not an attack) {_fmt(labels.get('dice_adaptive_oracle'))}."
                )
        for note in result["notes"]:
            lines.append(f"\nNote: {note}.")
        for attack, figure in result["figures"].items():
            lines.append(f"\n![{site} {attack}]({figure})")
        lines.append("")
    by_site = {site: labels for site, labels in (report.get("label_inference_by_site") or {}).items() if labels}
    if by_site:
        lines += [
            "## Label inference at every site",
            "",
            "Whole-tumour Dice of the mask each site infers from the gradients it received (plain: norm + Otsu; "
            "smoothed: the squared norm averaged first; adaptive: smoothing and threshold set from the gradient noise "
            "in the filter trail), each against what the site's own image gives without any gradient: as many of its "
            "most tumour-like voxels as that attack marks (in brackets). Also the best single threshold of the image "
            "(an oracle) and a random mask. Gain = the largest of the three attacks' gains over the own image.",
            "",
            "| site | plain (own) | smoothed (own) | adaptive (own) | AUC | own-image AUC | best threshold (oracle) "
            "| random | gain (attack) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for site, labels in by_site.items():
            lines.append(
                f"| {site} ({report.get('modalities', {}).get(site, '')}) | "
                f"{_fmt(labels['dice'])} ({_fmt(labels.get('dice_own_image'))}) | "
                f"{_fmt(labels.get('dice_smoothed'))} ({_fmt(labels.get('dice_own_image_smoothed'))}) | "
                f"{_fmt(labels.get('dice_adaptive'))} ({_fmt(labels.get('dice_own_image_adaptive'))}) | "
                f"{_fmt(labels.get('auc'))} | {_fmt(labels.get('auc_own_image'))} | "
                f"{_fmt(labels.get('dice_own_image_best_threshold'))} | {_fmt(labels['dice_random_mask'])} | "
                f"{_fmt(labels.get('gain_over_own_image'))} ({labels.get('gain_variant', '-')}) |"
            )
        lines.append("")
    lines += _active_markdown(report)
    return "\n".join(lines) + "\n"
