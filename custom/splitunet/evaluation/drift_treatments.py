"""Each drift treatment against its own topology's plain averaging, paired by seed: the comparison's answer to "does
DWCS (or FedProx) help here?", and DWCS against FedProx on the same topology ("which of the two?"); and, the same
way, each DP-SGD row against its topology without DP ("what does DP-SGD cost?").

The comparison's main table measures every row against the float32 vertical reference. That difference says how far
a topology is from the reference, not whether a treatment helps the topology it treats: SplitFed + DWCS minus the
reference mixes SplitFed's own cost with DWCS's effect. Here each treatment is paired with its plain row on the same
seed (same patients, same held-out cases, same initialisation), so the difference is the treatment's alone, with its
95 % Student's t interval over seeds (:func:`splitunet.evaluation.intervals.t_interval`).

Plain data in, plain data out: the rows are ``summarise_compare``'s (``key``, ``label``, ``dice_by_seed``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from splitunet.evaluation.intervals import interval_sign, t_interval
from splitunet.evaluation.utility import REGIONS, _interval_cell, _mean_dice

__all__ = ["DRIFT_TREATMENTS", "DP_TREATMENTS", "treatment_differences", "treatment_markdown"]

# (plain row, treated row): every averaging topology's treatments against its own plain FedAvg-weighted averaging,
# then DWCS against FedProx on the same topology (the ablation DWCS is measured by: which of the two corrections).
DRIFT_TREATMENTS: tuple[tuple[str, str], ...] = (
    ("splitfed", "splitfed_dwcs"),
    ("splitfed", "splitfed_fedprox"),
    ("fedavg", "fedavg_dwcs"),
    ("fedavg", "fedprox"),
    ("u_shape", "u_shape_dwcs"),
    ("splitfed_fedprox", "splitfed_dwcs"),
    ("fedprox", "fedavg_dwcs"),
)
# (row without DP, row with DP-SGD): the Dice cost of each epsilon, on the same patients and initialisation.
DP_TREATMENTS: tuple[tuple[str, str], ...] = (
    ("fedavg", "fedavg_dp_eps1"),
    ("fedavg", "fedavg_dp_eps3"),
    ("fedavg", "fedavg_dp_eps10"),
    ("split_unet", "split_unet_dp_eps3"),
)
_DRIFT_INTRO = (
    "Each drift treatment against its own topology's plain averaging, then DWCS against FedProx on the same "
    "topology, paired by seed (the treatment minus the row it is set against, Dice points, mean over seeds [95 % t "
    "interval]); the verdict reads the mean-Dice interval: 'helps' or 'hurts' only where it excludes 0."
)


def treatment_differences(rows: Sequence[Mapping], pairs: Sequence[tuple[str, str]] = DRIFT_TREATMENTS) -> list[dict]:
    """Paired differences of each treatment present to its plain row.

    Args:
        rows: the comparison's rows, each with ``key``, ``label`` and ``dice_by_seed`` (seed -> region -> Dice).
        pairs: ``(plain, treated)`` row keys: :data:`DRIFT_TREATMENTS` or :data:`DP_TREATMENTS`.

    Returns:
        one entry per treatment whose plain and treated rows are both among ``rows``, in ``pairs`` order:
        ``plain``, ``treated`` (keys), their labels, ``seeds`` (those both rows ran), and ``difference`` (``mean``
        and each region: ``t_interval`` of treated minus plain Dice over those seeds).
    """
    by_key = {row["key"]: row for row in rows}
    entries = []
    for plain_key, treated_key in pairs:
        if plain_key not in by_key or treated_key not in by_key:
            continue
        plain, treated = by_key[plain_key]["dice_by_seed"], by_key[treated_key]["dice_by_seed"]
        seeds = sorted(set(plain) & set(treated), key=int)
        difference = {
            region: t_interval([float(treated[s][region]) - float(plain[s][region]) for s in seeds])
            for region in REGIONS
        }
        difference["mean"] = t_interval([_mean_dice(treated[s]) - _mean_dice(plain[s]) for s in seeds])
        entries.append(
            {
                "plain": plain_key,
                "treated": treated_key,
                "plain_label": by_key[plain_key]["label"],
                "treated_label": by_key[treated_key]["label"],
                "seeds": [int(s) for s in seeds],
                "difference": difference,
            }
        )
    return entries


_VERDICTS = {None: "too few seeds to say", 1: "helps", -1: "hurts", 0: "no difference shown"}


def _verdict(interval: Mapping) -> str:
    """What the interval of the mean-Dice difference allows one to say (a point estimate alone says nothing)."""
    return _VERDICTS[interval_sign(interval)]


def treatment_markdown(entries: Sequence[Mapping], intro: str = _DRIFT_INTRO) -> str:
    """A table of the treatments' paired differences in Dice points with a verdict per row ("" without entries).

    Args:
        entries: :func:`treatment_differences`' entries.
        intro: the sentence above the table (default: the drift treatments').
    """
    if not entries:
        return ""
    lines = [
        intro,
        "",
        "| treatment | against | seeds | Δ mean Dice | Δ TC | Δ WT | Δ ET | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        difference = entry["difference"]
        cells = [
            entry["treated_label"],
            entry["plain_label"],
            ", ".join(str(seed) for seed in entry["seeds"]) or "-",
            _interval_cell(difference["mean"]),
            *(_interval_cell(difference[region]) for region in REGIONS),
            _verdict(difference["mean"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
