"""DP-SGD by Opacus around a model, its optimiser and a data loader: per-sample clipping, Gaussian noise, Poisson
batches, and the epsilon spent so far.

Ziller et al. (Scientific Reports 2021; "Differentially private federated deep learning for multi-site medical
image segmentation", 2022) train U-Nets this way. Every step, each training item in the batch contributes its own
gradient, clipped to L2 norm C over all parameters together; the sum gets N(0, (sigma C)^2) noise per coordinate and
is divided by the expected batch size. With Poisson sampling each item is in a batch with probability q,
independently, which is what the accountant's amplification by sampling assumes; an empty batch still takes a step
of noise alone.

The randomness that the guarantee rests on (the noise and which items are sampled) comes from generators seeded
from the operating system, never from the job's seed: a server that could replay the noise could subtract it.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterator

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from splitunet.dp.epsilon_budget import DPBudget
from splitunet.errors import SplitUNetConfigError

__all__ = ["BudgetExhausted", "PrivateTraining", "private_generator"]


class BudgetExhausted(SplitUNetConfigError):
    """A step beyond those the job's epsilon was projected for (a server asking for more rounds than it announced)."""


def private_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from the operating system's entropy, known to no other party."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


class PrivateTraining:
    """Opacus' ``PrivacyEngine.make_private`` with a budget fixed in advance.

    Args:
        model: the module to train (already through :func:`~splitunet.dp.dp_model.prepare_for_dp`); Opacus wraps it
            in a ``GradSampleModule`` (:attr:`module`) that shares its parameters, so the caller keeps reading and
            loading weights on ``model``.
        optimizer: its optimiser (any torch optimiser over ``model``'s parameters); wrapped as a ``DPOptimizer``.
        data_loader: batches of ``(inputs, targets)``, one item per protected unit (a training case); its batch size
            and length decide the sample rate. With ``budget.poisson_sampling`` Opacus replaces its sampler by
            Poisson sampling, drawing from the loader's generator (give it :func:`private_generator`).
        budget: sigma, C, q, the accountant and the number of steps allowed (:func:`~splitunet.dp.plan_budget`).
        noise_generator: the noise's generator (default: :func:`private_generator` on the parameters' device).

    Raises:
        SplitUNetConfigError: the loader's sample rate differs from the budget's (the projection would not hold).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        budget: DPBudget,
        noise_generator: torch.Generator | None = None,
    ):
        rate = 1.0 / len(data_loader)
        if abs(rate - budget.sample_rate) > 1e-12:
            raise SplitUNetConfigError(
                f"the data loader's sample rate {rate:.6g} (1 / {len(data_loader)} batches) is not the budget's "
                f"{budget.sample_rate:.6g}: the projected epsilon would not hold"
            )
        device = next(model.parameters()).device
        self.budget = budget
        with warnings.catch_warnings():
            # Opacus' secure_mode needs torchcsprng, which has no build for current torch; docs/dp.md says what the
            # private generators below do and do not give instead.
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            self.engine = PrivacyEngine(accountant=budget.accountant)
        self.module, self.optimizer, self.loader = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=budget.noise_multiplier,
            max_grad_norm=budget.max_grad_norm,
            poisson_sampling=budget.poisson_sampling,
            noise_generator=noise_generator or private_generator(device),
        )
        self.device = device
        self.steps_taken = 0
        self._batches: Iterator | None = None

    def _next_batch(self):
        # Opacus' Poisson loader yields 1/q batches per pass; a round needs any number of steps, so passes chain.
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None

    def step(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float | None:
        """One DP-SGD step on the next batch.

        Args:
            loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch's items (each item's loss depends on that
                item only: Opacus' per-sample gradients assume it).

        Returns:
            the batch's loss (local information: it is not covered by the privacy guarantee), or ``None`` for an
            empty Poisson batch, whose step adds noise only.

        Raises:
            BudgetExhausted: the budget's steps are all taken.
        """
        if self.steps_taken >= self.budget.steps:
            raise BudgetExhausted(
                f"DP-SGD budget spent: all {self.budget.steps} steps the epsilon of {self.budget.epsilon:.4g} (delta "
                f"{self.budget.delta:g}) was projected for are taken; no further step is allowed"
            )
        inputs, targets = self._next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss = None
        if len(inputs) == 0:
            # No item sampled: the released update is noise alone, and the step still counts for the accountant.
            for parameter in self.optimizer.params:
                parameter.grad_sample = torch.zeros(
                    (0, *parameter.shape), device=parameter.device, dtype=parameter.dtype
                )
        else:
            outputs = self.module(inputs.to(self.device))
            batch_loss = loss_fn(outputs, targets.to(self.device))
            with warnings.catch_warnings():
                # The inputs need no gradient, so torch notes that the first layer's hook sees outputs only; Opacus
                # needs nothing more (the activations are captured in the forward pass).
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                batch_loss.backward()
            loss = float(batch_loss.detach())
        self.optimizer.step()
        self.steps_taken += 1
        return loss

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far by Opacus' accountant, at ``delta`` (default the budget's)."""
        if self.steps_taken == 0:
            return 0.0
        return float(self.engine.accountant.get_epsilon(delta=self.budget.delta if delta is None else delta))
