"""DP-SGD for a model part whose loss is computed with another party: the vertical site's encoder, the U-shape's head
and tail.

The party runs the forward pass on a batch it did not draw privately (the server's crop plan, or a planner seeded
with the job's seed), sends the activations, and later back-propagates the gradient the server returned. Opacus'
per-sample gradient hooks (``GradSampleHooks``, on the party's own modules, whose state dicts stay as they are)
capture each layer's input in the forward pass and turn the backward pass into one gradient per row of the batch:

- **Scaling.** The server's loss is the mean over its batch of per-case terms (the job's Dice + BCE and MONAI's
  DiceFocal compute one Dice per case, and instance norm mixes no cases), so the gradient it returns for row i is
  ``(1/B) dl_i/dz_i``. Opacus' ``loss_reduction="mean"`` multiplies the backprops by the batch size B, so each row's
  gradient is that of its own case's loss ``l_i``, the unit C clips.
- **One gradient per case.** A batch may hold two crops of one case (a sampler's epoch boundary, or a server that
  repeats a case on purpose); only the case's first row contributes, so no case weighs more than one clipped
  gradient in a step.
- **Clip, noise, step.** Opacus' ``DPOptimizer`` clips each row to C over all parameters of the part together, sums,
  adds Gaussian noise of std sigma*C and divides by the number of distinct cases in the batch (which the server chose,
  so it depends on no data of the party), then steps the party's optimiser.

Each step is then a Gaussian mechanism of sensitivity C on every case, whichever batches the server chooses: sample
rate 1 for Opacus' accountant (:func:`~splitunet.dp.epsilon_budget.plan_split_budget` says why there is no
subsampling). What this covers and what it does not (the activations, the returned gradients, the losses) is in
``docs/dp.md``.

**Data-independent gradients** (FedProx's proximal gradient ``mu (w - w_anchor)`` at a SplitFed site) are added to
the private gradient after clipping, noise and scaling, just before the optimiser's step (``extra_gradients`` of
:meth:`PrivateSplitTraining.step`). Back-propagated with the server's gradient it would not even be clipped: the
proximal term does not pass through the modules' hooks, so it has no per-sample gradient, and ``DPOptimizer`` replaces
``p.grad`` by the noised sum of the per-sample ones, dropping it. Computed from the current weights (the party's
earlier DP-SGD outputs) and the averaged weights the server sent, it is post-processing of what is already released:
it costs no epsilon. A gradient that depends on the party's data must never be passed this way.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn

from splitunet.dp.epsilon_budget import DPBudget
from splitunet.dp.private_training import BudgetExhausted, private_generator
from splitunet.errors import SplitUNetConfigError

__all__ = ["PrivateSplitTraining", "first_row_of_each_case"]


def first_row_of_each_case(keys: Sequence[Hashable]) -> torch.Tensor:
    """The rows of a batch that contribute to a step: the first row of each case.

    Args:
        keys: the case of each row, as the batch names them (a case may appear in several rows).

    Returns:
        a boolean tensor, one entry per row.
    """
    kept = torch.zeros(len(keys), dtype=torch.bool)
    seen = set()
    for row, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            kept[row] = True
    return kept


class PrivateSplitTraining:
    """Opacus' per-sample gradients, clipping, noise and accountant for a part trained through returned gradients.

    Args:
        modules: the party's trainable modules (already through :func:`~splitunet.dp.dp_model.prepare_for_dp`); each
            gets Opacus' hooks and stays the module the party saves and averages.
        optimizer: their optimiser (over exactly their parameters); wrapped as :attr:`optimizer`, a ``DPOptimizer``
            whose state dict is the original's.
        budget: sigma, C, the accountant and the most steps allowed
            (:func:`~splitunet.dp.epsilon_budget.plan_split_budget`; sample rate 1).
        noise_generator: the noise's generator (default: :func:`~splitunet.dp.private_generator` on the parameters'
            device, seeded from the operating system).

    Raises:
        SplitUNetConfigError: the optimiser does not hold exactly the modules' parameters, or the budget assumes a
            sample rate below 1 (this class samples nothing).

    Attributes:
        steps_taken: DP-SGD steps taken (each one composed by the accountant).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        budget: DPBudget,
        noise_generator: torch.Generator | None = None,
    ):
        parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
        optimised = [p for group in optimizer.param_groups for p in group["params"]]
        if {id(p) for p in parameters} != {id(p) for p in optimised}:
            raise SplitUNetConfigError(
                "DP-SGD needs the optimiser to hold exactly the trained modules' parameters: every one is clipped and "
                "noised together"
            )
        if budget.sample_rate != 1.0:
            raise SplitUNetConfigError(
                f"the budget assumes sample rate {budget.sample_rate:g}, but a split party samples nothing: plan it "
                "with plan_split_budget"
            )
        self.budget = budget
        self.hooks = [GradSampleHooks(module, batch_first=True, loss_reduction="mean") for module in modules]
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=budget.noise_multiplier,
            max_grad_norm=budget.max_grad_norm,
            # Set per step to the batch's number of distinct cases (step()).
            expected_batch_size=1,
            loss_reduction="mean",
            generator=noise_generator or private_generator(parameters[0].device),
        )
        self.accountant = create_accountant(mechanism=budget.accountant)
        # Opacus' own hook: after every noised step the accountant records (sigma, q = 1).
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=budget.sample_rate))
        self.steps_taken = 0

    def backward(self, tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor] | None = None) -> None:
        """``torch.autograd.backward``, through the hooks that compute the per-row gradients."""
        with warnings.catch_warnings():
            # The crops need no gradient, so torch notes that the first layer's hook sees outputs only; Opacus needs
            # nothing more (each layer's input was captured in the forward pass).
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            torch.autograd.backward(list(tensors), None if grad_tensors is None else list(grad_tensors))

    def require_step(self) -> None:
        """Refuse a step beyond the budget (call it before computing one).

        Raises:
            BudgetExhausted: every step the epsilon was projected for is taken.
        """
        if self.steps_taken >= self.budget.steps:
            raise BudgetExhausted(
                f"DP-SGD budget spent: all {self.budget.steps} steps the epsilon of {self.budget.epsilon:.4g} (delta "
                f"{self.budget.delta:g}) was projected for are taken; no further step is allowed"
            )

    def step(
        self, keys: Sequence[Hashable], extra_gradients: Mapping[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Clip, sum, noise and apply the per-row gradients of the last backward pass, one row per case.

        Args:
            keys: the case of each row of the batch (the rows of the forward pass, in order).
            extra_gradients: parameter -> a gradient that depends on no data of the party (FedProx's proximal
                gradient), added after clipping, noise and scaling, before the optimiser's step: neither clipped nor
                noised, and no epsilon spent on it (module docstring).

        Raises:
            BudgetExhausted: the budget's steps are all taken.
            ValueError: the per-row gradients are not those of a batch of ``len(keys)`` rows, or an extra gradient is
                for a parameter this training does not optimise or has another shape.
        """
        self.require_step()
        extra = dict(extra_gradients or {})
        optimised = {id(parameter) for parameter in self.optimizer.params}
        for parameter, gradient in extra.items():
            if id(parameter) not in optimised or tuple(gradient.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"an extra gradient of shape {tuple(gradient.shape)} is not for a parameter of this DP-SGD training"
                )
        kept = first_row_of_each_case(keys)
        for parameter in self.optimizer.params:
            rows = getattr(parameter, "grad_sample", None)
            if not isinstance(rows, torch.Tensor) or rows.shape[0] != len(keys):
                raise ValueError(
                    f"DP-SGD expected one gradient per row of a batch of {len(keys)} for every parameter, got "
                    f"{None if rows is None else tuple(getattr(rows, 'shape', ()))}"
                )
            # A case's second row contributes nothing: clipped, its zero gradient stays zero.
            rows[~kept.to(rows.device)] = 0
        self.optimizer.expected_batch_size = int(kept.sum())
        if not extra:
            self.optimizer.step()
        else:
            # DPOptimizer.step is pre_step (clip, noise, scale, the accountant's hook) then the wrapped optimiser's
            # step; the data-independent gradients go in between, where Opacus neither clips nor overwrites them.
            if self.optimizer.pre_step():
                for parameter, gradient in extra.items():
                    parameter.grad.add_(gradient.to(device=parameter.grad.device, dtype=parameter.grad.dtype))
                self.optimizer.original_optimizer.step()
        self.steps_taken += 1

    def zero_grad(self) -> None:
        """Clear gradients and per-row gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far by Opacus' accountant, at ``delta`` (default the budget's)."""
        if self.steps_taken == 0:
            return 0.0
        # The RDP accountant notes when its best order is at the edge of its range; the PRV accountant takes
        # log(1 - q) = -inf at sample rate 1, which it handles.
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            warnings.simplefilter("ignore", UserWarning)
            return float(self.accountant.get_epsilon(delta=self.budget.delta if delta is None else delta))

    def state_dict(self) -> dict:
        """Steps taken and the accountant's record (kept in the party's checkpoint, so a resumed run goes on
        spending from where it was)."""
        return {"steps_taken": self.steps_taken, "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            SplitUNetConfigError: the record is of another accountant, noise or sample rate, or of more steps than the
                budget.
        """
        history = [tuple(entry) for entry in state["accountant"]["history"]]
        steps = int(state["steps_taken"])
        schedule = {(float(sigma), float(rate)) for sigma, rate, _ in history}
        expected = (float(self.budget.noise_multiplier), float(self.budget.sample_rate))
        mechanism = state["accountant"].get("mechanism")
        if (
            mechanism != self.accountant.mechanism()
            or steps != sum(int(count) for _, _, count in history)
            or not schedule <= {expected}
        ):
            raise SplitUNetConfigError(
                f"the checkpoint's DP-SGD record ({mechanism} accountant, {steps} steps, {history}) is not of this "
                f"job's schedule ({self.accountant.mechanism()} accountant, sigma {expected[0]:.4g}, sample rate "
                f"{expected[1]:g}): its epsilon would not be this job's"
            )
        if steps > self.budget.steps:
            raise SplitUNetConfigError(
                f"the checkpoint took {steps} DP-SGD steps, more than the {self.budget.steps} this job's epsilon was "
                "projected for"
            )
        self.accountant.load_state_dict({"history": history, "mechanism": mechanism})
        self.steps_taken = steps
