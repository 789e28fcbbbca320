"""What ``splitunet leakage-u-shape`` reports: crops pooled over the hospitals, intervals, verdicts, markdown.

Inversion rows (one per hospital, iteration, attack and modality) are pooled over the hospitals: the brain-mask SSIM
of the reconstruction comes with a 95 % Student's t interval over crops, and so does its gain over the mean-image
prior (per crop, attack minus prior); the leak reported is the larger of the attack's and the prior's mean SSIM (an
attack below the prior has failed, not been stopped). Label rows (one per crop) are pooled per iteration and over
every iteration: the gradient-norm attack's Dice (Otsu's threshold: the wire adds no noise, so the attacker has
nothing to smooth away; the adaptive rule and its best threshold are listed beside it) and the gradient score's AUC
with intervals, each gradient-free
baseline's means, and two gains with intervals (per crop): over the uninformed prior (the auxiliary patients' tumour
frequency), which decides whether the gradient keeps the labels from the server, and over the best route that needs
no gradient (the known tail's prediction, the reconstructed FLAIR; chosen by mean Dice against the truth, generous to
it), which says whether the gradient adds to what the server has anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from splitunet.evaluation.intervals import t_interval
from splitunet.wire.protocol import MODALITIES

__all__ = ["pool_inversion", "pooled_scores", "pool_labels", "u_shape_summary", "u_shape_markdown", "format_interval"]

_BASELINE_NAMES = {
    "tumour_frequency": "tumour frequency of auxiliary patients",
    "prediction": "prediction of the known tail",
    "reconstructed_flair": "brightest voxels of the reconstructed FLAIR",
}
# What the server knows with no hospital's data at all; the other baselines are routes to the labels without the
# gradient, through what the U-shape gives the server (x0, u2, the averaged tail).
UNINFORMED = "tumour_frequency"


def _finite_pairs(first: Sequence[float], second: Sequence[float]) -> list[tuple[float, float]]:
    return [(a, b) for a, b in zip(first, second) if math.isfinite(a) and math.isfinite(b)]


def pool_inversion(rows: Sequence[Mapping]) -> list[dict]:
    """One entry per ``(iteration, attack, modality)``, its crops pooled over the hospitals.

    Returns:
        ``{"iteration", "local_steps", "attack", "modality", "crops", "ssim_brain" (interval), "ssim_prior_brain",
        "ssim_reported_brain", "gain_brain" (interval), "ssim", "ssim_prior", "gain" (interval, whole crop)}``.
    """
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = (row["iteration"], row["attack"], row["modality"])
        entry = groups.setdefault(
            key,
            {"iteration": row["iteration"], "local_steps": row["local_steps"], "attack": row["attack"],
             "modality": row["modality"], "hospitals": [], "crops": {}},
        )  # fmt: skip
        entry["hospitals"].append(row["hospital"])
        for name, values in row["per_crop"].items():
            entry["crops"].setdefault(name, []).extend(values)
    pooled = []
    for entry in groups.values():
        entry.update(pooled_scores(entry.pop("crops")))
        pooled.append(entry)
    return sorted(pooled, key=lambda e: (e["iteration"], e["attack"], MODALITIES.index(e["modality"])))


def pooled_scores(crops: Mapping[str, Sequence[float]]) -> dict:
    """The scores of a set of crops: brain-mask SSIM with its interval, the prior's, the leak reported and the gain.

    Args:
        crops: per-crop lists ``"ssim"``, ``"ssim_prior"``, ``"ssim_brain"``, ``"ssim_prior_brain"`` (the rows'
            ``per_crop``, concatenated), the same crops in the same order in each.

    Returns:
        ``{"crops", "ssim_brain" (interval), "ssim_prior_brain", "ssim_reported_brain" (the larger of the two
        means: an attack below the prior has failed, not been stopped), "gain_brain" (interval of attack minus
        prior, per crop), "ssim", "ssim_prior", "gain" (interval, whole crop)}``.
    """
    brain = _finite_pairs(crops["ssim_brain"], crops["ssim_prior_brain"])
    whole = _finite_pairs(crops["ssim"], crops["ssim_prior"])
    attack_mean = t_interval([a for a, _ in brain])
    prior_mean = t_interval([p for _, p in brain])["mean"]
    return {
        "crops": len(crops["ssim"]),
        "ssim_brain": attack_mean,
        "ssim_prior_brain": prior_mean,
        "ssim_reported_brain": max(attack_mean["mean"], prior_mean),
        "gain_brain": t_interval([a - p for a, p in brain]),
        "ssim": t_interval([a for a, _ in whole])["mean"],
        "ssim_prior": t_interval([p for _, p in whole])["mean"],
        "gain": t_interval([a - p for a, p in whole]),
    }


def _pool_label_crops(crops: Sequence[Mapping], iteration, local_steps) -> dict:
    names = sorted(set.intersection(*(set(row["baselines"]) for row in crops)))
    baselines = {
        name: {key: t_interval([row["baselines"][name][key] for row in crops])["mean"] for key in ("dice", "auc")}
        for name in names
    }
    routes = [name for name in names if name != UNINFORMED]
    best = max(routes, key=lambda name: baselines[name]["dice"], default=None)

    def gain(name: str | None) -> dict | None:
        return t_interval([row["dice"] - row["baselines"][name]["dice"] for row in crops]) if name else None

    return {
        "iteration": iteration,
        "local_steps": local_steps,
        "crops": len(crops),
        "dice": t_interval([row["dice"] for row in crops]),
        **{
            key: t_interval([row[key] for row in crops])["mean"]
            for key in ("dice_smoothed", "dice_adaptive", "dice_adaptive_oracle", "dice_random_mask")
        },
        "auc": t_interval([row["auc"] for row in crops]),
        "baselines": baselines,
        "gain_over_prior": gain(UNINFORMED if UNINFORMED in names else None),
        "best_route": best,
        "gain_over_route": gain(best),
    }


def pool_labels(rows: Sequence[Mapping]) -> list[dict]:
    """One entry per iteration, the crops of every hospital pooled, then (with several iterations) one entry of every
    crop (``"iteration": "all"``).

    Returns:
        ``{"iteration", "local_steps", "crops", "dice" (interval: the gradient norm, Otsu's threshold), "auc"
        (interval), "dice_smoothed", "dice_adaptive", "dice_adaptive_oracle" (the best of the adaptive rule's
        thresholds, picked with the truth), "dice_random_mask", "baselines": name -> {"dice", "auc"} (means),
        "gain_over_prior" (interval: Dice minus the tumour frequency's, per crop), "best_route" (the gradient-free
        route with the highest mean Dice), "gain_over_route" (interval, minus that route's)}``; a gain is ``None``
        without its baseline.
    """
    by_iteration: dict[int, list[Mapping]] = {}
    for row in rows:
        by_iteration.setdefault(row["iteration"], []).append(row)
    pooled = [_pool_label_crops(crops, i, crops[0]["local_steps"]) for i, crops in sorted(by_iteration.items())]
    if len(by_iteration) > 1:
        pooled.append(_pool_label_crops(list(rows), "all", None))
    return pooled


def _span(values: Sequence[float]) -> str:
    """``0.61`` for one value (or equal ones), ``0.58-0.66`` for a range."""
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return low if low == high else f"{low}-{high}"


def _inputs_verdict(pooled: Sequence[Mapping]) -> str:
    starts = [e for e in pooled if e["local_steps"] == 0]
    later = [e for e in pooled if e["local_steps"] > 0]
    parts = []
    if starts:
        ssim = [e["ssim_brain"]["mean"] for e in starts]
        prior = [e["ssim_prior_brain"] for e in starts]
        beaten = all(e["gain_brain"]["low"] > 0 for e in starts)
        parts.append(
            f"At a round's first iteration (iterations {sorted({e['iteration'] for e in starts})}) the server inverts "
            f"x0 through the head it knows: brain SSIM {_span(ssim)} over the four modalities (prior {_span(prior)}); "
            + ("every modality above the prior with its interval: x0 does not hide the images."
               if beaten else "not every modality's gain interval lies above zero.")
        )  # fmt: skip
    if later:
        best = {}
        for entry in later:
            key = (entry["iteration"], entry["modality"])
            if key not in best or entry["ssim_brain"]["mean"] > best[key]["ssim_brain"]["mean"]:
                best[key] = entry
        gains = [e["gain_brain"] for e in best.values()]
        parts.append(
            f"After {sorted({e['local_steps'] for e in later})} local steps the best attack per modality "
            f"({', '.join(sorted({e['attack'] for e in best.values()}))}) gains "
            f"{min(g['mean'] for g in gains):+.2f} to {max(g['mean'] for g in gains):+.2f} over the prior; "
            + ("every gain interval lies above zero." if all(g["low"] > 0 for g in gains)
               else "not every gain interval lies above zero.")
        )  # fmt: skip
    return " ".join(parts)


def _labels_verdict(pooled: Sequence[Mapping]) -> tuple[bool, str]:
    """``(labels kept from the server, sentence)``, from every crop pooled: kept unless the gradient attack beats the
    uninformed prior with its interval above zero."""
    entry = next((e for e in pooled if e["iteration"] == "all"), pooled[0] if len(pooled) == 1 else None)
    if entry is None or entry["gain_over_prior"] is None:
        return True, "No label inference was measured."
    over_prior = entry["gain_over_prior"]
    text = (
        f"from dL/du2 alone the server marks each crop's whole tumour with Dice {format_interval(entry['dice'])} "
        f"(AUC {entry['auc']['mean']:.2f}), {format_interval(over_prior, '+')} over the tumour frequency of auxiliary "
        "patients"
    )
    kept = not over_prior["low"] > 0
    verdict = (
        f"Not shown: {text}, an interval reaching zero." if kept
        else f"No: {text}. The labels never cross, but their gradient gives them away."
    )  # fmt: skip
    route, over_route = entry["best_route"], entry["gain_over_route"]
    if route:
        name = _BASELINE_NAMES.get(route, route)
        relation = (
            "the gradient adds to that" if over_route["low"] > 0
            else "that route does better than the gradient" if over_route["high"] < 0
            else "no difference between the two is measured"
        )  # fmt: skip
        verdict += (
            f" Without the gradient the server does best with the {name}: Dice "
            f"{entry['baselines'][route]['dice']:.2f} (AUC {entry['baselines'][route]['auc']:.2f}); {relation} "
            f"({format_interval(over_route, '+')})."
        )
    return kept, verdict


def u_shape_summary(report: Mapping) -> dict:
    """Pooled inversion and label entries and the two verdicts, from a report's rows."""
    inversion = pool_inversion(report["inversion"])
    labels = pool_labels(report["labels"])
    kept, labels_text = _labels_verdict(labels)
    return {
        "inversion": inversion,
        "labels": labels,
        "labels_kept_from_server": kept,
        "verdict_inputs": _inputs_verdict(inversion),
        "verdict_labels": labels_text,
    }


def format_interval(entry: Mapping, sign: str = "") -> str:
    """``0.61 [0.52, 0.70]`` (``sign="+"``: signed), or the mean alone without bounds."""
    if not math.isfinite(entry["low"]):
        return f"{entry['mean']:{sign}.2f}"
    return f"{entry['mean']:{sign}.2f} [{entry['low']:{sign}.2f}, {entry['high']:{sign}.2f}]"


def u_shape_markdown(report: Mapping) -> str:
    """The report as markdown: settings, the two tables, the checks and the verdicts."""
    settings, summary = report["settings"], report["summary"]
    lines = [
        "# Leakage in the U-shape: what the server learns from x0 and dL/du2",
        "",
        f"{len(report['hospitals'])} hospitals {report['hospitals']} (training cases), phantoms "
        f"{'x'.join(map(str, settings['shape']))}, crops {'x'.join(map(str, settings['crop_size']))}, batch "
        f"{settings['batch_size']}, features {settings['features']}, {settings['iterations_per_round']} iterations a "
        f"round, wire int{settings['wire_bits'] or 32}; attacked iterations {report['iterations']}. In-process run of "
        f"the job's trainers; {report['elapsed_s']:.0f} s on {settings['threads']} thread(s).",
        "",
        "## Input inversion from x0",
        "",
        "Brain-mask SSIM per modality, mean and 95 % t interval over the crops of every hospital; prior: the mean "
        "auxiliary image at the same place; reported: the larger of attack and prior; gain: attack minus prior, per "
        "crop.",
        "",
        "| iteration | local steps | attack | modality | crops | SSIM | prior | reported | gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["inversion"]:
        lines.append(
            f"| {e['iteration']} | {e['local_steps']} | {e['attack']} | {e['modality']} | {e['crops']} | "
            f"{format_interval(e['ssim_brain'])} | {e['ssim_prior_brain']:.2f} | {e['ssim_reported_brain']:.2f} | "
            f"{format_interval(e['gain_brain'], '+')} |"
        )
    names = sorted({name for e in summary["labels"] for name in e["baselines"]})
    lines += [
        "",
        "## Label inference from dL/du2 (whole tumour)",
        "",
        "Gradient-norm attack with Otsu's threshold (Dice, AUC); beside it the adaptive rule (smoothed, Otsu or a "
        "quantile) and the best of its thresholds picked with the truth (an upper bound); chance: a random mask of "
        "the attack's size. Baselines the server has without gradients, Dice / AUC: "
        + "; ".join(f"{name}: {_BASELINE_NAMES.get(name, name)}" for name in names)
        + ". Every baseline marks as many voxels as the plain gradient attack. Gains, per crop: attack minus the "
        "tumour frequency (the uninformed prior), and minus the best gradient-free route (named).",
        "",
        "| iteration | local steps | crops | Dice | AUC | adaptive / best | chance | "
        + " | ".join(names)
        + " | gain over prior | gain over best route |",
        "|---|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for e in summary["labels"]:
        steps = "-" if e["local_steps"] is None else e["local_steps"]
        cells = [
            f"{e['baselines'][n]['dice']:.2f} / {e['baselines'][n]['auc']:.2f}" if n in e["baselines"] else "-"
            for n in names
        ]
        gain = format_interval(e["gain_over_prior"], "+") if e["gain_over_prior"] else "-"
        route = f"{format_interval(e['gain_over_route'], '+')} ({e['best_route']})" if e["gain_over_route"] else "-"
        lines.append(
            f"| {e['iteration']} | {steps} | {e['crops']} | {format_interval(e['dice'])} | "
            f"{format_interval(e['auc'])} | "
            f"{e['dice_adaptive']:.2f} / {e['dice_adaptive_oracle']:.2f} | {e['dice_random_mask']:.2f} | "
            + " | ".join(cells)
            + f" | {gain} | {route} |"
        )
    view = report["server_view"]
    replay = report["replay"]
    lines += [
        "",
        "## Checks",
        "",
        f"- What the server held: {view['exchanges']} exchanges of shapes {view['tensors']} and the head and tail at "
        f"the rounds starting at iterations {view['known_parts']}; nothing of an image's, a label's or a prediction's "
        "shape. The label attack reads dL/du2 alone.",
        f"- The evaluator's replay of the crops reproduces the received x0 through the known head at "
        f"{sum(r['matches'] for r in replay.values())} of {len(replay)} round starts "
        f"(largest error {max((r['max_abs_error'] for r in replay.values()), default=0):.2g}).",
        "",
        "## Verdict",
        "",
        f"- Inputs: {summary['verdict_inputs']}",
        f"- Labels: {summary['verdict_labels']}",
        "",
    ]
    return "\n".join(lines)
