"""What ``splitunet sweep`` reports from one run's leakage reports: crops pooled over every attacked site, intervals,
the best attack, label inference per site, and the markdown tables.

A run's leakage reports (one per attacked iteration) hold, per site and attack, the scores of each crop
(``per_crop``). Pooling them over the four sites gives 8 crops at batch size 2; the mean brain-mask SSIM comes with
a 95 % Student's t interval over crops, and so does the attack's gain over the mean-image prior (per crop, attack
minus prior), the figure the goals are judged on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from splitunet.evaluation.intervals import t_interval

__all__ = ["pool_inversions", "best_pooled", "tradeoff_points", "label_summary", "utility_cell", "sweep_markdown"]

# The attacks whose adaptive variant is listed beside them.
_SIDE_BY_SIDE = ("white_box", "learned_inverse")


def pool_inversions(report: Mapping) -> list[dict]:
    """One entry per ``(attack, level)`` of a leakage report, its crops pooled over every attacked site.

    Returns:
        ``{"attack", "level", "sites", "crops", "ssim_brain", "ssim_prior_brain", "gain_brain", "ssim", "ssim_prior",
        "seconds"}``: ``ssim_brain`` and ``gain_brain`` (attack minus prior, per crop) are :func:`t_interval`
        dicts, the prior a mean.
    """
    pooled: dict[tuple[str, str], dict] = {}
    for site, result in report["sites"].items():
        for row in result["inversion"]:
            entry = pooled.setdefault(
                (row["attack"], row["level"]),
                {"attack": row["attack"], "level": row["level"], "sites": [], "crops": {}, "seconds": 0.0},
            )
            entry["sites"].append(site)
            entry["seconds"] += row.get("seconds", 0.0)
            for key, values in row["per_crop"].items():
                entry["crops"].setdefault(key, []).extend(values)
    out = []
    for entry in pooled.values():
        crops = entry.pop("crops")
        pairs = [
            (attack, prior)
            for attack, prior in zip(crops["ssim_brain"], crops["ssim_prior_brain"])
            if math.isfinite(attack) and math.isfinite(prior)
        ]
        entry.update(
            crops=len(crops["ssim"]),
            ssim_brain=t_interval([attack for attack, _ in pairs]),
            ssim_prior_brain=t_interval([prior for _, prior in pairs])["mean"],
            gain_brain=t_interval([attack - prior for attack, prior in pairs]),
            ssim=t_interval(crops["ssim"])["mean"],
            ssim_prior=t_interval(crops["ssim_prior"])["mean"],
            seconds=round(entry["seconds"], 1),
        )
        out.append(entry)
    return out


def best_pooled(pooled: Sequence[Mapping]) -> Mapping | None:
    """The pooled entry with the highest mean brain-mask SSIM (``None`` when nothing was inverted)."""
    return max(pooled, key=lambda entry: entry["ssim_brain"]["mean"], default=None)


def tradeoff_points(rows: Sequence[Mapping], iteration: str) -> list[dict]:
    """The trade-off figure's points: per sweep row with a utility study and an inversion at ``iteration``, the mean
    Dice (mean of TC/WT/ET) with its 95 % t interval over the utility study's seeds, and the best attack's mean
    brain-mask SSIM with its interval over crops.

    Returns:
        ``{"label", "dice", "dice_interval", "ssim", "ssim_interval", "ssim_prior"}`` per row (an interval is a
        :func:`t_interval` dict, its bounds NaN with one seed).
    """
    points = []
    for row in rows:
        best = best_pooled(row["attacks"][iteration]["inversion"]) if iteration in row.get("attacks", {}) else None
        utility = row.get("utility")
        if not best or not utility:
            continue
        per_seed = [sum(dice.values()) / len(dice) for dice in (utility.get("dice_by_seed") or {}).values() if dice]
        dice = t_interval(per_seed or [sum(utility["dice_mean"].values()) / len(utility["dice_mean"])])
        points.append(
            {
                "label": row["label"],
                "dice": dice["mean"],
                "dice_interval": dice,
                "ssim": best["ssim_brain"]["mean"],
                "ssim_interval": best["ssim_brain"],
                "ssim_prior": best["ssim_prior_brain"],
            }
        )
    return points


_VARIANT_DICE = {"plain": "dice", "smoothed": "dice_smoothed", "adaptive": "dice_adaptive"}
_VARIANT_OWN = {"plain": "dice_own_image", "smoothed": "dice_own_image_smoothed", "adaptive": "dice_own_image_adaptive"}


def label_summary(report: Mapping) -> dict:
    """Label inference per site from a leakage report: the attack (plain, smoothed or adaptive) with the largest gain
    over the site's own image marking as many voxels, its Dice, that own-image Dice, the gain, and both AUCs; plus
    the largest gain over the sites."""
    by_site = {}
    for site, labels in (report.get("label_inference_by_site") or {}).items():
        if not labels:
            continue
        variant = labels.get("gain_variant")
        if variant:
            # The attack with the largest gain, against the own image marking as many voxels as it does.
            attack = labels[_VARIANT_DICE[variant]]
            own = labels[_VARIANT_OWN[variant]]
        elif "dice_own_image" not in labels:
            # Scored without the site's image: no baseline, no gain.
            variant, attack, own = None, max(labels[key] for key in _VARIANT_DICE.values() if key in labels), None
        else:
            raise ValueError(
                f"{site}'s label report predates the per-attack own-image baseline; refresh it "
                "(splitunet.evaluation.leakage.report.refresh_label_inference)"
            )
        by_site[site] = {
            "dice": attack,
            "attack": variant,
            "dice_own_image": own,
            "gain_over_own_image": labels.get("gain_over_own_image") if own is not None else None,
            "auc": labels.get("auc"),
            "auc_own_image": labels.get("auc_own_image"),
        }
    gains = [entry["gain_over_own_image"] for entry in by_site.values() if entry["gain_over_own_image"] is not None]
    return {"by_site": by_site, "largest_gain": max(gains) if gains else None}


def utility_cell(utility_row: Mapping | None) -> str:
    """The mean-Dice change of a setting against the float32 reference, from a ``splitunet utility`` row."""
    if not utility_row:
        return "-"
    interval = utility_row["difference_to_reference"]["mean"]
    if interval["n"] < 2 or not math.isfinite(interval["low"]):
        return f"{100 * interval['mean']:+.1f}"
    return f"{100 * interval['mean']:+.1f} [{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}]"


def _interval_text(interval: Mapping, sign: str = "") -> str:
    """``mean [low, high]`` at two decimals (``sign="+"`` writes the sign); the mean alone without bounds."""
    if not math.isfinite(interval["low"]):
        return f"{interval['mean']:{sign}.2f}"
    return f"{interval['mean']:{sign}.2f} [{interval['low']:{sign}.2f}, {interval['high']:{sign}.2f}]"


def _ssim_cell(entry: Mapping | None) -> str:
    return _interval_text(entry["ssim_brain"]) if entry else "-"


def _gain_cell(entry: Mapping | None) -> str:
    return _interval_text(entry["gain_brain"], "+") if entry else "-"


def _best_of(pooled: Sequence[Mapping], attack: str) -> Mapping | None:
    return best_pooled([entry for entry in pooled if entry["attack"] == attack])


def _megabytes(row: Mapping, first: Mapping) -> str:
    megabytes = row.get("activation_bytes_per_iteration") or 0
    base = first.get("activation_bytes_per_iteration")
    ratio = f" ({megabytes / base:.2f}x)" if megabytes and base else ""
    return f"{megabytes / 1e6:.1f}{ratio}"


def sweep_markdown(summary: Mapping) -> str:
    """The sweep's tables from ``sweep.json``: cost and best attack; plain and adaptive attacks side by side; label
    inference per site; attacks at the middle and last iteration."""
    rows = summary["rows"]
    first_iteration, *later = summary["attack_iterations"]
    lines = [
        f"Preset `{summary['preset']}`: {summary['iterations']} training iterations per run; attacks on every site's "
        f"activations at iteration {first_iteration} (the encoders as initialised; the attacker knows them: "
        "`--assume-known-init`, the worst case) and, with the attacks that need no site weights, at "
        + ", ".join(str(i) for i in later)
        + ". SSIM inside the brain mask, mean over the crops of every site with a 95 % Student's t interval over "
        "crops; gain = attack minus the mean-image prior, per crop.",
        "",
        "| setting | activation MB / iteration (4 sites) | mean Dice vs float32, points [95 % CI] | best attack "
        f"(iteration {first_iteration}) | SSIM [95 % CI] | prior | gain over prior [95 % CI] | label inference: "
        "largest gain over own image (site) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pooled = row["attacks"][str(first_iteration)]["inversion"]
        best = best_pooled(pooled)
        labels = row["attacks"][str(first_iteration)]["labels"]
        gain = labels["largest_gain"]
        site = (
            max(labels["by_site"], key=lambda s: labels["by_site"][s]["gain_over_own_image"] or -1.0)
            if gain is not None
            else None
        )
        label_cell = "no gradients" if not row.get("train_encoders", True) else "-"
        if gain is not None:
            label_cell = f"{gain:+.2f} ({site})"
        attack = f"{best['attack']} {best['level']}" if best else "-"
        prior = f"{best['ssim_prior_brain']:.2f}" if best else "-"
        lines.append(
            f"| {row['label']} | {_megabytes(row, rows[0])} | {utility_cell(row.get('utility'))} | {attack} "
            f"| {_ssim_cell(best)} | {prior} | {_gain_cell(best)} | {label_cell} |"
        )
    lines += [
        "",
        f"Each attack at iteration {first_iteration}, plain and adapted to the defense side by side (its best "
        "level; brain-mask SSIM [95 % CI]):",
        "",
        "| setting | " + " | ".join(f"{a} | {a} adaptive" for a in _SIDE_BY_SIDE) + " | unsplit | substitute_encoder |",
        "|---|" + "---|" * (2 * len(_SIDE_BY_SIDE) + 2),
    ]
    for row in rows:
        pooled = row["attacks"][str(first_iteration)]["inversion"]
        cells = []
        for attack in _SIDE_BY_SIDE:
            cells += [_ssim_cell(_best_of(pooled, attack)), _ssim_cell(_best_of(pooled, attack + "_adaptive"))]
        cells += [_ssim_cell(_best_of(pooled, "unsplit")), _ssim_cell(_best_of(pooled, "substitute_encoder"))]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    sites = sorted({site for row in rows for site in row["attacks"][str(first_iteration)]["labels"]["by_site"]})
    if sites:
        lines += [
            "",
            f"Label inference from the gradients of iteration {first_iteration}, per site: the attack's Dice (the "
            "better of plain and adaptive) / the same number of the site's own most tumour-like voxels / gain; AUC "
            "of the gradient score (of the own image):",
            "",
            "| setting | " + " | ".join(sites) + " |",
            "|---|" + "---|" * len(sites),
        ]
        for row in rows:
            by_site = row["attacks"][str(first_iteration)]["labels"]["by_site"]
            cells = []
            for site in sites:
                entry = by_site.get(site)
                if not entry or entry["dice_own_image"] is None:
                    cells.append("-")
                    continue
                cells.append(
                    f"{entry['dice']:.2f} / {entry['dice_own_image']:.2f} / {entry['gain_over_own_image']:+.2f}; "
                    f"AUC {entry['auc']:.2f} ({entry['auc_own_image']:.2f})"
                )
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if later:
        header = " | ".join(f"iteration {i}: best attack | SSIM [95 % CI] | gain over prior" for i in later)
        lines += [
            "",
            "Later iterations, attacks that need no site weights (UnSplit, substitute encoder), crops of every site:",
            "",
            f"| setting | {header} | label gain at iteration {later[0]} |",
            "|---|" + "---|---|---|" * len(later) + "---|",
        ]
        for row in rows:
            cells = []
            for iteration in later:
                best = best_pooled(row["attacks"][str(iteration)]["inversion"])
                attack = f"{best['attack']} {best['level']}" if best else "-"
                cells += [attack, _ssim_cell(best), _gain_cell(best)]
            gain = row["attacks"][str(later[0])]["labels"]["largest_gain"]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {'-' if gain is None else f'{gain:+.2f}'} |")
    if summary.get("elapsed_s") is not None:
        train = sum(row["train_s"] for row in rows)
        attack = sum(row["attack_s"] for row in rows)
        lines += [
            "",
            f"Whole sweep: {summary['elapsed_s'] / 60:.0f} min for {len(rows)} runs ({train / 60:.0f} min training, "
            f"{attack / 60:.0f} min attacks; {summary.get('threads', '?')} threads).",
        ]
    return "\n".join(lines) + "\n"
