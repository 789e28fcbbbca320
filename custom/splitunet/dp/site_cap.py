"""A site's own ceiling on the epsilon a job may spend on its patients, checked before it trains.

A hospital states it in its ``local/privacy.json`` (FLARE ignores the key), next to its scopes and minimum defense::

    "splitunet_epsilon_cap": {"max_epsilon": 8.0, "delta": 1e-5}

``delta`` is optional: the delta the site judges at (without it, the job's own delta). At setup the site projects the
job's epsilon from the job's DP settings and step budget (:func:`splitunet.dp.plan_budget`), at the site's delta,
and refuses a job that would exceed the cap, and any job that trains without DP-SGD, whose epsilon is unbounded.
Plain Python and Opacus' accountant; no FLARE, so any executor (or its tests) can call :func:`check_epsilon_cap`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING

from splitunet.errors import SplitUNetConfigError
from splitunet.site.policy_file import ABSENT, policy_entry

if TYPE_CHECKING:  # the check itself needs no Opacus: a site without it still refuses jobs without DP
    from splitunet.dp.epsilon_budget import DPBudget

__all__ = [
    "EPSILON_CAP_KEY",
    "EpsilonCap",
    "EpsilonCapExceeded",
    "parse_epsilon_cap",
    "read_epsilon_cap",
    "check_epsilon_cap",
]

EPSILON_CAP_KEY = "splitunet_epsilon_cap"


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)


class EpsilonCapExceeded(SplitUNetConfigError):
    """A job refused because its projected epsilon exceeds the site's cap (the message names both, and no data)."""


@dataclass(frozen=True)
class EpsilonCap:
    """The most epsilon a site lets one job spend on its training cases.

    Args:
        max_epsilon: the cap.
        delta: the delta the cap is meant at (``None``: the job's).
        source: where it was read (for messages).
    """

    max_epsilon: float
    delta: float | None = None
    source: str = f"local/privacy.json {EPSILON_CAP_KEY}"

    def __post_init__(self):
        if not _is_number(self.max_epsilon) or not 0 < self.max_epsilon < math.inf:
            raise SplitUNetConfigError(
                f"{self.source}: max_epsilon must be a finite number > 0, got {self.max_epsilon!r}"
            )
        if self.delta is not None and (not _is_number(self.delta) or not 0 < self.delta < 1):
            raise SplitUNetConfigError(f"{self.source}: delta must be a number in (0, 1), got {self.delta!r}")


def parse_epsilon_cap(content: object, source: str) -> EpsilonCap:
    """Validate a cap entry ``{"max_epsilon": ..., "delta": ...}``.

    Raises:
        SplitUNetConfigError: not a mapping, unknown keys, or bad values (the message names the file).
    """
    if not isinstance(content, Mapping) or "max_epsilon" not in content or set(content) - {"max_epsilon", "delta"}:
        raise SplitUNetConfigError(
            f'{source}: {EPSILON_CAP_KEY} must be {{"max_epsilon": <number>}} with an optional "delta", got {content!r}'
        )
    return EpsilonCap(content["max_epsilon"], content.get("delta"), source)


def read_epsilon_cap(privacy_file: str | Path) -> EpsilonCap | None:
    """The cap a site's ``privacy.json`` states, or ``None`` when the file or the entry is absent.

    Raises:
        SplitUNetConfigError: the file cannot be read or the entry is malformed.
    """
    entry = policy_entry(privacy_file, EPSILON_CAP_KEY)
    if entry is ABSENT:
        return None
    return parse_epsilon_cap(entry, f"local/{Path(privacy_file).name} {EPSILON_CAP_KEY}")


def check_epsilon_cap(cap: EpsilonCap | None, budget: DPBudget | None, party: str) -> str | None:
    """Refuse a job whose projected epsilon exceeds the site's cap.

    Args:
        cap: the site's cap (``None``: the site states none, and any job passes).
        budget: the job's projected DP-SGD budget at this site; ``None`` for a job without DP-SGD.
        party: this site.

    Returns:
        a line for the site's log saying what was checked, or ``None`` without a cap.

    Raises:
        EpsilonCapExceeded: naming the site, the cap, its delta and the projected epsilon (and the schedule it comes
            from); no case, path or other data.
    """
    if cap is None:
        return None
    if budget is None:
        raise EpsilonCapExceeded(
            f"site {party} refuses this job: it trains without DP-SGD, so its epsilon is unbounded (inf), above the "
            f"site's cap max_epsilon {cap.max_epsilon:g} ({cap.source})"
        )
    delta = budget.delta if cap.delta is None else cap.delta
    epsilon = budget.epsilon if delta == budget.delta else budget.epsilon_at(delta)
    schedule = (
        f"sigma {budget.noise_multiplier:.4g}, sample rate {budget.sample_rate:.4g}, {budget.steps} steps, "
        f"{budget.accountant} accountant"
    )
    if not math.isfinite(epsilon) or epsilon > cap.max_epsilon:
        raise EpsilonCapExceeded(
            f"site {party} refuses this job: its projected epsilon {epsilon:.4g} at delta {delta:g} ({schedule}) "
            f"exceeds the site's cap max_epsilon {cap.max_epsilon:g} ({cap.source})"
        )
    return f"projected epsilon {epsilon:.4g} at delta {delta:g} ({schedule}) is within the cap {cap.max_epsilon:g}"
