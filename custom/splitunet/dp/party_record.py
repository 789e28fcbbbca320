"""How a split party (a vertical site, a U-shape hospital) admits a job under its epsilon cap, and what it keeps about
its DP-SGD in its own ``results.json``: the settings, the budget it admitted the job with, its cap, and the epsilon it
has spent, round by round.

Epsilon, delta and step counts are computed from the schedule, never from data, so the record may travel too; the
losses are not in it. Plain Python: no torch, no Opacus (the party's trainer loads Opacus when it plans DP-SGD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from splitunet.dp.site_cap import EpsilonCap, check_epsilon_cap, read_epsilon_cap

if TYPE_CHECKING:
    from splitunet.dp.dp_model import DPModelChanges
    from splitunet.dp.dp_settings import DPSettings
    from splitunet.dp.epsilon_budget import DPBudget

__all__ = ["PrivacyRecord", "admit_job", "describe_budget"]


class PrivateTrainer(Protocol):
    """What :func:`admit_job` asks of a party's trainer (``SiteTrainer``, ``HospitalTrainer``)."""

    dp_changes: DPModelChanges | None

    def plan_privacy(self, settings: DPSettings, steps: int) -> DPBudget: ...


def describe_budget(budget: DPBudget) -> str:
    """One log line: the schedule and the projected epsilon (no data)."""
    return (
        f"DP-SGD over at most {budget.steps} steps (sigma {budget.noise_multiplier:.4g}, C {budget.max_grad_norm:g}, "
        f"sample rate {budget.sample_rate:.4g}, {budget.accountant} accountant): projected epsilon "
        f"{budget.epsilon:.4g} at delta {budget.delta:g} for its {budget.num_cases} cases"
    )


@dataclass
class PrivacyRecord:
    """A party's DP-SGD record (``dp`` in its ``results.json``).

    Args:
        settings: the job's DP settings.
        budget: the budget the party admitted the job with.
        model_changes: :meth:`~splitunet.dp.dp_model.DPModelChanges.as_dict` of its modules.
        site_cap: the party's epsilon cap, if it states one.

    Attributes:
        epsilon: spent so far, at the budget's delta.
        steps: DP-SGD steps taken so far.
        epsilon_per_round: ``{"steps", "epsilon", ...}`` each time the party recorded it (with where: the
            iteration, the round).
    """

    settings: DPSettings
    budget: DPBudget
    model_changes: dict
    site_cap: EpsilonCap | None = None
    epsilon: float = 0.0
    steps: int = 0
    epsilon_per_round: list[dict] = field(default_factory=list)

    def spent(self, epsilon: float, steps: int, **where) -> None:
        """Record the epsilon spent after ``steps`` steps (``where``: e.g. ``iteration=40`` or ``round=2``)."""
        self.epsilon, self.steps = float(epsilon), int(steps)
        self.epsilon_per_round.append({**where, "steps": self.steps, "epsilon": self.epsilon})

    def line(self) -> str:
        """One log line: the epsilon spent so far."""
        return (
            f"DP-SGD epsilon {self.epsilon:.4g} at delta {self.budget.delta:g} spent after {self.steps} of at most "
            f"{self.budget.steps} steps"
        )

    def to_json(self) -> dict:
        """The ``dp`` entry of ``results.json`` (the FedAvg hospitals' keys, plus ``steps``)."""
        cap = self.site_cap
        return {
            "settings": self.settings.as_dict(),
            "budget": self.budget.as_dict(),
            "model_changes": dict(self.model_changes),
            "site_cap": None if cap is None else {"max_epsilon": cap.max_epsilon, "delta": cap.delta},
            "epsilon": self.epsilon,
            "delta": self.budget.delta,
            "steps": self.steps,
            "epsilon_per_round": [dict(entry) for entry in self.epsilon_per_round],
        }


def admit_job(
    party: str, settings: DPSettings | None, steps: int | None, trainer: PrivateTrainer, privacy_file: str | Path
) -> tuple[PrivacyRecord | None, list[str]]:
    """Fix the party's DP-SGD budget (with ``settings``) and check it against its epsilon cap, before anything leaves.

    Args:
        party: the party.
        settings: the job's DP settings (``None``: the job trains without DP-SGD).
        steps: the most steps the job may take at the party.
        trainer: the party's trainer, built.
        privacy_file: the party's ``local/privacy.json`` (its cap, if it states one).

    Returns:
        ``(record, log lines)``: the record (``None`` without DP-SGD) and what the party's log should say.

    Raises:
        EpsilonCapExceeded: the projected epsilon exceeds the cap, or the job trains without DP-SGD and the party
            states a cap (the message names the cap and the projection only).
    """
    budget = trainer.plan_privacy(settings, steps) if settings is not None else None
    cap = read_epsilon_cap(privacy_file)
    checked = check_epsilon_cap(cap, budget, party)
    lines = [checked] if checked else []
    if budget is None:
        return None, lines
    lines.append(f"{describe_budget(budget)}; model: {trainer.dp_changes.summary()}")
    return PrivacyRecord(settings, budget, trainer.dp_changes.as_dict(), cap), lines
