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

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from splitunet.dp.dp_settings import ACCOUNTANTS, DPSettings
from splitunet.errors import SplitUNetConfigError

__all__ = ["DPBudget", "opacus_sample_rate", "project_epsilon", "plan_budget", "plan_split_budget"]


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
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # The RDP accountant warns when its best order is at the edge of those it tries (huge epsilons); the PRV
        # accountant takes log(1 - q) = -inf at sample rate 1 (a split party's), which it handles.
        warnings.simplefilter("ignore", UserWarning)
        return float(ledger.get_epsilon(delta=delta))


@dataclass(frozen=True)
class DPBudget:
    """What one party's DP-SGD (a hospital's, a split site's) will spend over a whole job, fixed before it trains.

    Attributes:
        noise_multiplier: sigma (given, or found for ``target_epsilon``).
        max_grad_norm: C.
        sample_rate: q.
        steps: T, the job's optimiser steps at this party (FedAvg: rounds times local iterations; split: the most
            steps the job may take).
        delta: the delta epsilon is reported at.
        epsilon: the projected epsilon after ``steps`` steps.
        accountant: the Opacus accountant.
        poisson_sampling: whether batches are Poisson-sampled (the accountant's assumption; never in a split job,
            whose sample rate is 1).
        num_cases: N, the party's training cases (the dataset epsilon protects).
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
    _check_steps(steps)
    return _budget(settings, num_cases, opacus_sample_rate(num_cases, batch_size), steps)


def plan_split_budget(settings: DPSettings, num_cases: int, steps: int) -> DPBudget:
    """The budget of a split-learning party (a vertical site, a U-shape hospital), whose batches it does not draw
    privately: the server chooses them, or knows the seed they are drawn from.

    Sampling by the one who chooses the batches amplifies nothing against that party, so the sample rate is 1: each
    step is a Gaussian mechanism on every case, even one the server puts in every batch, as
    :class:`~splitunet.dp.private_split.PrivateSplitTraining` runs it (one clipped gradient per case and step). A coin
    of the party's own, keeping each case with probability q, would let the accountant use q, but the noise q calls
    for is then at least as large, relative to the signal q leaves, as at rate 1 at every setting tabulated in
    docs/dp.md ("Sampling"): the server fixes the batch, so subsampling only discards cases.

    Args:
        settings: the job's DP settings (``poisson_sampling`` must be false: there is no sampling to amplify by).
        num_cases: N, the party's cases that may be trained on (for the default delta).
        steps: the most optimiser steps the job may take at this party.

    Raises:
        SplitUNetConfigError: Poisson sampling asked for, bad sizes, a delta not below 1/N, or a target epsilon that
            Opacus cannot reach.
    """
    _check_steps(steps)
    if settings.poisson_sampling:
        raise SplitUNetConfigError(
            "dp: a split party does not draw its own batches (the server chooses them, or knows their seed), so there "
            "is no sampling to amplify by: set poisson_sampling false (every case of a batch contributes once, sample "
            "rate 1)"
        )
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 1:
        raise SplitUNetConfigError(f"num_cases must be an int >= 1, got {num_cases!r}")
    return _budget(settings, num_cases, 1.0, steps)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SplitUNetConfigError(f"the job's DP-SGD steps must be an int >= 1, got {steps!r}")


def _budget(settings: DPSettings, num_cases: int, sample_rate: float, steps: int) -> DPBudget:
    """Sigma (given, or found by Opacus for ``target_epsilon``), delta and the projected epsilon at rate ``q``."""
    delta = settings.resolve_delta(num_cases)
    sigma = settings.noise_multiplier
    if sigma is None:
        try:
            with warnings.catch_warnings(), np.errstate(divide="ignore"):  # as in project_epsilon
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
