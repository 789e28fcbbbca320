"""The update a hospital shares for one batch, without or with DP-SGD, as the gradient inversion attack observes it.

Without DP the observed update is the batch's gradient (one local step of plain gradient descent, divided by the
learning rate). With DP it is what DP-SGD hands its optimiser: every sample's gradient clipped to L2 norm C, summed,
Gaussian noise of std ``sigma * C`` added, divided by the batch size (Abadi et al., CCS 2016). It is computed by
Opacus itself (``GradSampleModule`` for the per-sample gradients, ``DPOptimizer.pre_step`` to clip, noise and scale)
on a copy of the model, so the attack meets the real mechanism. Any optimiser step the hospital then takes (SGD,
Adam) is post-processing of that gradient, so attacking the privatised gradient itself is the attacker's best case.

The epsilon of one such step at ``delta`` is Opacus' RDP accountant's (:func:`one_step_epsilon`), with sample rate
1 by default: the attacker sees this very batch, so no amplification by sampling is claimed.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from splitunet.evaluation.attacks.base import check_positive
from splitunet.filters.accounting import gaussian_epsilon

__all__ = [
    "DPSetting",
    "ObservedUpdate",
    "plain_gradient",
    "private_gradient",
    "per_sample_gradient_norms",
    "observed_update",
    "one_step_epsilon",
    "noise_for_epsilon",
]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DPSetting:
    """DP-SGD's two knobs for one step.

    Attributes:
        noise_multiplier: sigma: the noise std divided by ``max_grad_norm`` (>= 0).
        max_grad_norm: C: every sample's gradient is clipped to this L2 norm (> 0).
        delta: the delta epsilon is reported at.
        sample_rate: probability that a sample is in the batch, for the accountant (1: no amplification).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    sample_rate: float = 1.0

    def __post_init__(self):
        if isinstance(self.noise_multiplier, bool) or not 0 <= self.noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        check_positive("max_grad_norm", self.max_grad_norm)
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")

    @property
    def epsilon(self) -> float:
        """Epsilon of one step (:func:`one_step_epsilon`)."""
        return one_step_epsilon(self.noise_multiplier, self.delta, self.sample_rate)


@dataclass
class ObservedUpdate:
    """What the attacker observes of one batch, and under which mechanism.

    Attributes:
        gradient: parameter name -> gradient (plain, or clipped and noised).
        dp: the DP setting, ``None`` without DP.
        epsilon: epsilon of the step at ``dp.delta`` (``inf`` without DP).
    """

    gradient: dict[str, torch.Tensor]
    dp: DPSetting | None
    epsilon: float


def _check_batch(images: torch.Tensor, targets: torch.Tensor) -> None:
    if images.dim() != 5 or targets.dim() != 5 or images.shape[0] != targets.shape[0]:
        raise ValueError(
            f"images and targets must be (B, C, D, H, W) with the same B, got {tuple(images.shape)} and "
            f"{tuple(targets.shape)}"
        )


def plain_gradient(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn: Loss
) -> dict[str, torch.Tensor]:
    """The batch's gradient of ``loss_fn(model(images), targets)`` by parameter name (the model is not changed)."""
    _check_batch(images, targets)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    loss = loss_fn(model(images), targets)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {name: g.detach().clone() for (name, _), g in zip(named, grads)}


def _backward_quietly(loss: torch.Tensor) -> None:
    # Opacus' hooks warn that a full backward hook fires while the first module's input needs no gradient: true, and
    # harmless (the per-sample gradients are those of the parameters).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()


def _opacus_copy(model: nn.Module) -> nn.Module:
    # Opacus' per-sample hooks wrap module outputs, and autograd refuses in-place changes of such outputs, so the
    # copy's in-place activations (MONAI's LeakyReLU(inplace=True)) compute into new tensors: same values.
    twin = copy.deepcopy(model).train()
    for module in twin.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return twin


def per_sample_gradient_norms(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn: Loss
) -> torch.Tensor:
    """Each sample's gradient L2 norm ``(B,)``, by Opacus' per-sample gradients (what DP-SGD clips)."""
    from opacus import GradSampleModule

    _check_batch(images, targets)
    wrapped = GradSampleModule(_opacus_copy(model), loss_reduction="mean")
    _backward_quietly(loss_fn(wrapped(images), targets))
    squares = [p.grad_sample.reshape(len(images), -1).pow(2).sum(1) for p in wrapped.parameters() if p.requires_grad]
    return torch.stack(squares).sum(0).sqrt().detach()


def private_gradient(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Loss,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient of one batch by Opacus: per-sample clipping to ``max_grad_norm``, Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` on the sum, divided by the batch size.

    ``loss_fn`` must be the mean of per-sample losses over the batch (the job's ``dice_ce`` is:
    Dice per sample and region, then means), which Opacus' ``loss_reduction="mean"`` assumes.

    Args:
        model: the global model; a copy is wrapped, the model itself is not changed.
        images, targets: the batch ``(B, C, D, H, W)``.
        loss_fn: the training loss.
        noise_multiplier: sigma (>= 0).
        max_grad_norm: C (> 0).
        seed: seed of the noise (Opacus' ``generator``).

    Returns:
        parameter name (as ``model`` names it) -> privatised gradient.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    _check_batch(images, targets)
    setting = DPSetting(noise_multiplier, max_grad_norm)
    twin = _opacus_copy(model)
    named = [(name, p) for name, p in twin.named_parameters() if p.requires_grad]
    wrapped = GradSampleModule(twin, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD([p for _, p in named], lr=1.0),
        noise_multiplier=setting.noise_multiplier,
        max_grad_norm=setting.max_grad_norm,
        expected_batch_size=len(images),
        loss_reduction="mean",
        generator=torch.Generator(device=images.device).manual_seed(int(seed)),
    )
    optimizer.zero_grad(set_to_none=True)
    _backward_quietly(loss_fn(wrapped(images), targets))
    # Clip, sum, noise and scale, exactly as DP-SGD's step would; the step itself is not taken.
    optimizer.pre_step()
    return {name: p.grad.detach().clone() for name, p in named}


def observed_update(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Loss,
    dp: DPSetting | None = None,
    seed: int = 0,
) -> ObservedUpdate:
    """The update the hospital shares for this batch, without DP (``dp=None``) or with DP-SGD.

    Returns:
        :class:`ObservedUpdate` with the gradient and the step's epsilon.
    """
    if dp is None:
        return ObservedUpdate(plain_gradient(model, images, targets, loss_fn), None, math.inf)
    gradient = private_gradient(model, images, targets, loss_fn, dp.noise_multiplier, dp.max_grad_norm, seed=seed)
    return ObservedUpdate(gradient, dp, dp.epsilon)


def one_step_epsilon(noise_multiplier: float, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon of one DP-SGD step at ``delta`` (Opacus' RDP accountant; add/remove neighbours, sensitivity C)."""
    return gaussian_epsilon(noise_multiplier, 1, delta, sample_rate)


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float = 1.0, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier whose one-step epsilon at ``delta`` is at most ``epsilon`` (bisection).

    Raises:
        ValueError: a non-positive epsilon.
    """
    check_positive("epsilon", epsilon)
    low, high = 0.0, 1.0
    while one_step_epsilon(high, delta, sample_rate) > epsilon:
        low, high = high, high * 2
    while high - low > tolerance * high:
        middle = (low + high) / 2
        if one_step_epsilon(middle, delta, sample_rate) > epsilon:
            low = middle
        else:
            high = middle
    return high
