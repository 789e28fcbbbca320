"""A whole job's epsilon, projected before training through Opacus' own accountant.

DP-SGD composes one sampled Gaussian mechanism per optimiser step: noise multiplier sigma, sample rate q (the
probability that a given training case is in a step's batch), and the number of steps T. The accountant turns
``(sigma, q, T)`` and delta into epsilon without looking at any data, so a hospital knows before it trains what a
job will spend, and can refuse it (:mod:`splitunet.dp.site_cap`). Training then spends exactly this (the same
accountant, fed the same steps by Opacus' optimiser hook), never more: the trainer refuses steps beyond ``T``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from splitunet.dp.dp_settings import ACCOUNTANTS, DPSettings
from splitunet.errors import SplitUNetConfigError

__all__ = ["DPBudget", "opacus_sample_rate", "project_epsilon", "plan_budget"]


def opacus_sample_rate(num_cases: int, batch_size: int) -> float:
    """The sample rate Opacus gives a data loader of ``num_cases`` items in batches of ``batch_size``.

    ``PrivacyEngine.make_private`` uses ``1 / len(data_loader)``, and a loader has ``ceil(N / B)`` batches; so q is
    ``1 / ceil(N / B)``, which is ``B / N`` when ``B`` divides ``N`` and a little more otherwise.
    """
    for name, value in (("num_cases", num_cases), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SplitUNetConfigError(f"{name} must be an int >= 1, got {value!r}")
    return 1.0 / math.ceil(num_cases / batch_size)


def _accountant(name: str):
    if name not in ACCOUNTANTS:
        raise SplitUNetConfigError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return create_accountant(mechanism=name)


def project_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"):
    """Epsilon after ``steps`` DP-SGD steps, by the named Opacus accountant (0 before the first step).

    Args:
        noise_multiplier: sigma.
        sample_rate: q, in (0, 1].
        steps: T, optimiser steps.
        delta: the delta of (epsilon, delta).
        accountant: ``"rdp"`` or ``"prv"``.
    """
    if steps < 0 or not 0 < sample_rate <= 1 or noise_multiplier <= 0 or not 0 < delta < 1:
        raise SplitUNetConfigError(
            f"cannot project epsilon for sigma {noise_multiplier}, q {sample_rate}, {steps} steps, delta {delta}"
        )
    if steps == 0:
        return 0.0
    ledger = _accountant(accountant)
    # Opacus' own record of T identical steps, exactly what its optimiser hook appends during training.
    ledger.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        # The RDP accountant warns when its best order is at the edge of those it tries (huge epsilons).
        warnings.simplefilter("ignore", UserWarning)
        return float(ledger.get_epsilon(delta=delta))


@dataclass(frozen=True)
class DPBudget:
    """What one hospital's DP-SGD will spend over a whole job, fixed before it trains.

    Attributes:
        noise_multiplier: sigma (given, or found for ``target_epsilon``).
        max_grad_norm: C.
        sample_rate: q.
        steps: T, the job's optimiser steps at this hospital (rounds times local iterations).
        delta: the delta epsilon is reported at.
        epsilon: the projected epsilon after ``steps`` steps.
        accountant: the Opacus accountant.
        poisson_sampling: whether batches are Poisson-sampled (the accountant's assumption).
        num_cases: N, the hospital's training cases (the dataset epsilon protects).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    accountant: str
    poisson_sampling: bool
    num_cases: int

    def epsilon_at(self, delta: float, steps: int | None = None) -> float:
        """Epsilon of this schedule at another ``delta`` (and after ``steps``, default the whole job's)."""
        return project_epsilon(
            self.noise_multiplier, self.sample_rate, self.steps if steps is None else steps, delta, self.accountant
        )

    def as_dict(self) -> dict:
        """JSON-serializable record (for ``results.json``)."""
        return asdict(self)


def plan_budget(settings: DPSettings, num_cases: int, batch_size: int, steps: int) -> DPBudget:
    """Resolve sigma and delta for a hospital and project the whole job's epsilon.

    Args:
        settings: the job's DP settings.
        num_cases: the hospital's training cases N.
        batch_size: the expected batch size B (q follows as :func:`opacus_sample_rate`).
        steps: the job's optimiser steps at this hospital.

    Raises:
        SplitUNetConfigError: bad sizes, a delta not below 1/N, or a target epsilon that Opacus cannot reach.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SplitUNetConfigError(f"the job's DP-SGD steps must be an int >= 1, got {steps!r}")
    sample_rate = opacus_sample_rate(num_cases, batch_size)
    delta = settings.resolve_delta(num_cases)
    sigma = settings.noise_multiplier
    if sigma is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sigma = float(
                    get_noise_multiplier(
                        target_epsilon=settings.target_epsilon,
                        target_delta=delta,
                        sample_rate=sample_rate,
                        steps=steps,
                        accountant=settings.accountant,
                    )
                )
        except ValueError as error:
            raise SplitUNetConfigError(
                f"dp: no noise multiplier reaches target_epsilon {settings.target_epsilon} at delta {delta:g} over "
                f"{steps} steps at sample rate {sample_rate:.4g}: {error}"
            ) from error
    epsilon = project_epsilon(sigma, sample_rate, steps, delta, settings.accountant)
    return DPBudget(
        noise_multiplier=sigma,
        max_grad_norm=float(settings.max_grad_norm),
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        epsilon=epsilon,
        accountant=settings.accountant,
        poisson_sampling=settings.poisson_sampling,
        num_cases=num_cases,
    )
