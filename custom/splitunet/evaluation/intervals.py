"""Student's t intervals for the small samples the evaluation reports (a few seeds, a few crops)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["t_interval", "interval_sign", "proportion_interval"]

# Two-sided 95 % Student's t quantiles by degrees of freedom (scipy is not a dependency of the evaluation); beyond 30
# degrees of freedom the normal quantile is within 2 %.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_interval(values: Sequence[float]) -> dict:
    """Mean and 95 % Student's t interval of ``values`` (non-finite values and ``None`` left out).

    Returns:
        ``{"mean", "low", "high", "n"}``; the bounds are NaN with fewer than 2 values.
    """
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": len(values)}
    degrees = len(values) - 1
    quantile = _T95[degrees - 1] if degrees <= len(_T95) else 1.96
    half = quantile * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def interval_sign(interval: dict) -> int | None:
    """Which side of 0 a :func:`t_interval` lies on: 1 above, -1 below, 0 where it holds 0; ``None`` where it has
    no bounds (fewer than 2 values): what a paired difference allows one to say, never a point estimate alone."""
    if interval.get("n", 0) < 2 or not math.isfinite(interval.get("low", math.nan)):
        return None
    if interval["low"] > 0:
        return 1
    if interval["high"] < 0:
        return -1
    return 0


def proportion_interval(successes: int, trials: int) -> dict:
    """A rate and its 95 % Wilson score interval (sound at 0 or all successes, where the normal one collapses).

    Returns:
        ``{"rate", "low", "high", "n"}``; NaN without trials.
    """
    if trials <= 0:
        return {"rate": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    z, rate = 1.959964, successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return {"rate": rate, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "n": trials}
