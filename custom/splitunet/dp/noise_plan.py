"""How much noise a target epsilon costs a hospital of a given size, before anyone trains.

For a job of ``T`` steps and a target ``(epsilon, delta)``, Opacus finds the noise multiplier sigma from the sample
rate ``q = 1 / ceil(N / B)``. DP-SGD then adds Gaussian noise of standard deviation ``sigma * C / B`` to every
coordinate of the mean clipped gradient, whose norm is at most ``C``: ``sigma / B`` is the noise per coordinate in
units of the largest signal a step can carry. A small hospital has a large ``q``, so the same epsilon calls for a
large sigma, and its few cases leave ``B`` small: both make ``sigma / B`` large. This table is what a site (or a
consortium planning a DP job) reads to see whether DP-SGD can learn at its size, as ``docs/dp.md`` shows::

    python3 -m splitunet.dp.noise_plan --cases 6 60 600 --batch 2 --steps 400 --epsilons 1 3 10

The figures come from :func:`splitunet.dp.plan_budget`, the projection every DP job runs at its first task, with the
bundle's default delta for each ``N`` unless ``--delta`` is given. No data, no model, no training.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from splitunet.dp.dp_settings import ACCOUNTANTS, DPSettings
from splitunet.dp.epsilon_budget import plan_budget

__all__ = ["NoisePlanRow", "noise_plan", "noise_plan_markdown", "main"]


@dataclass(frozen=True)
class NoisePlanRow:
    """The noise one hospital's DP-SGD needs for a target epsilon.

    Attributes:
        num_cases: N, the hospital's training cases.
        batch_size: B, the expected batch size.
        steps: T, the job's optimiser steps at the hospital.
        target_epsilon: the epsilon the job may spend.
        delta: the delta it is spent at.
        noise_multiplier: sigma that Opacus' accountant finds for it.
        sample_rate: q.
        epochs: ``T * q``, how many times each case is expected to be used.
        noise_per_coordinate: ``sigma / B``, the noise's standard deviation on the mean step per coordinate, in
            units of the clipping norm C (the most signal the mean clipped gradient can carry in norm).
    """

    num_cases: int
    batch_size: int
    steps: int
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    epochs: float
    noise_per_coordinate: float


def noise_plan(
    cases: Sequence[int],
    batch_sizes: Sequence[int],
    steps: int,
    epsilons: Sequence[float],
    delta: float | None = None,
    accountant: str = "rdp",
) -> list[NoisePlanRow]:
    """Sigma and the per-coordinate noise of every combination of hospital size, batch size and target epsilon.

    Args:
        cases: hospital sizes N to tabulate.
        batch_sizes: batch sizes B (each must not exceed every N).
        steps: T, the job's optimiser steps at a hospital.
        epsilons: target epsilons.
        delta: the delta of every row; ``None``: the bundle's default for each N (``min(1e-5, 1/(10 N))``).
        accountant: ``"rdp"`` or ``"prv"``.

    Raises:
        SplitUNetConfigError: a bad size, delta or accountant, or an epsilon Opacus cannot reach (from
            :func:`~splitunet.dp.plan_budget`, which names it).
    """
    rows = []
    for num_cases in cases:
        for batch_size in batch_sizes:
            for epsilon in epsilons:
                settings = DPSettings(target_epsilon=float(epsilon), delta=delta, accountant=accountant)
                budget = plan_budget(settings, int(num_cases), int(batch_size), int(steps))
                rows.append(
                    NoisePlanRow(
                        num_cases=int(num_cases),
                        batch_size=int(batch_size),
                        steps=int(steps),
                        target_epsilon=float(epsilon),
                        delta=budget.delta,
                        noise_multiplier=budget.noise_multiplier,
                        sample_rate=budget.sample_rate,
                        epochs=budget.steps * budget.sample_rate,
                        noise_per_coordinate=budget.noise_multiplier / int(batch_size),
                    )
                )
    return rows


def noise_plan_markdown(rows: Sequence[NoisePlanRow]) -> str:
    """The rows as a Markdown table (the one ``docs/dp.md`` shows)."""
    lines = [
        "| training cases N | batch B | steps T | epochs T·q | target ε | δ | σ | q "
        "| noise per coordinate σ/B (units of C) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.num_cases} | {row.batch_size} | {row.steps} | {row.epochs:.1f} | {row.target_epsilon:g} | "
            f"{row.delta:.0e} | {row.noise_multiplier:.2f} | {row.sample_rate:.4f} | {row.noise_per_coordinate:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Command line: print the table; return its rows as dicts."""
    parser = argparse.ArgumentParser(
        prog="python3 -m splitunet.dp.noise_plan",
        description="sigma and the noise per coordinate that a target epsilon costs hospitals of given sizes",
    )
    parser.add_argument("--cases", type=int, nargs="+", required=True, help="hospital sizes N (training cases)")
    parser.add_argument("--batch", type=int, nargs="+", default=[2], help="batch sizes B (default 2, the jobs')")
    parser.add_argument("--steps", type=int, required=True, help="the job's optimiser steps at a hospital")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 10.0], help="target epsilons")
    parser.add_argument("--delta", type=float, help="delta (default: min(1e-5, 1/(10 N)) for each N)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")
    args = parser.parse_args(argv)
    rows = noise_plan(args.cases, args.batch, args.steps, args.epsilons, args.delta, args.accountant)
    print(noise_plan_markdown(rows), end="")
    return [asdict(row) for row in rows]


if __name__ == "__main__":
    main()
