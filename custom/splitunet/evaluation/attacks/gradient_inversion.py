"""Gradient inversion of a shared weight update: rebuild a hospital's training crop from what it sent the server.

In the horizontal FedAvg job (and in the U-shape's averaged head and tail) each hospital sends its new weights; the
server knows the global weights it started the round from, so it holds the update. For one local step of plain
gradient descent the update divided by the learning rate is that batch's gradient; for several steps, or for Adam,
:func:`update_to_gradient` turns it into a gradient *direction* estimate (the attack matches directions only, so its
scale does not matter, but a multi-step or Adam update is a distorted one: Adam's first step is about
``lr * sign(g)``).

:class:`GradientInversion` is "inverting gradients" (Geiping, Bauermeister, Dröge and Moeller, NeurIPS 2020) as Ziller
et al. applied it to a segmentation model ("Differentially private federated deep learning for multi-site medical
image segmentation", 2021; code ``TUM-AIMED/PrivateSegmentation``): optimise a dummy input, and its label map, so
that the model's gradient at them points where the observed one points, under a total-variation image prior.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitunet.evaluation.attacks.base import Attack, check_non_negative, check_positive, check_positive_int
from splitunet.evaluation.attacks.objectives import total_variation_3d

__all__ = [
    "GradientInversion",
    "GradientInversionResult",
    "LABEL_MODES",
    "WEIGHTINGS",
    "gradient_distance",
    "update_to_gradient",
]

# How the attacker gets the label map: optimised with the image from the prior tumour frequency, or handed the truth
# (an oracle: the upper bound when some other channel leaks the labels).
LABEL_MODES = ("joint", "known")
# "global": 1 - cosine of all chosen parameters' gradients concatenated (Geiping et al.); "layer": the mean over
# parameter tensors of 1 - their own cosine, so that small full-resolution layers count as much as large deep ones.
WEIGHTINGS = ("global", "layer")
# Label probabilities are kept inside [eps, 1 - eps] when they become logits.
_LABEL_EPS = 0.02


def update_to_gradient(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], learning_rate: float, steps: int = 1
) -> dict[str, torch.Tensor]:
    """The gradient a weight update stands for: ``(before - after) / (learning_rate * steps)`` per parameter.

    Exact for one step of plain gradient descent without weight decay. For ``steps`` > 1 it is the mean gradient
    over the local steps (each at a different weight); for Adam it is only a direction estimate. Entries that are not
    floating point (integer buffers) are left out.

    Args:
        before: the global weights the round started from (name -> tensor).
        after: the weights the hospital sent back.
        learning_rate: the local learning rate (> 0).
        steps: local steps in the round (>= 1).

    Raises:
        ValueError: names or shapes that differ, or a bad rate or step count.
    """
    check_positive("learning_rate", learning_rate)
    check_positive_int("steps", steps)
    if set(before) != set(after):
        raise ValueError(
            f"update entries differ: only before {sorted(set(before) - set(after))[:3]}, "
            f"only after {sorted(set(after) - set(before))[:3]}"
        )
    gradient = {}
    for name, start in before.items():
        end = torch.as_tensor(after[name])
        start = torch.as_tensor(start)
        if start.shape != end.shape:
            raise ValueError(f"{name}: shape {tuple(start.shape)} before, {tuple(end.shape)} after")
        if start.is_floating_point():
            gradient[name] = (start.double() - end.double()).float() / (learning_rate * steps)
    return gradient


def gradient_distance(
    dummy: Sequence[torch.Tensor], observed: Sequence[torch.Tensor], weighting: str = "global"
) -> torch.Tensor:
    """1 - cosine similarity of two gradients given as matching lists of tensors (see :data:`WEIGHTINGS`).

    Returns:
        scalar tensor in [0, 2]: 0 when the directions agree.
    """
    if weighting == "global":
        dot = sum((d * o).sum() for d, o in zip(dummy, observed))
        dummy_norm = torch.sqrt(sum(d.pow(2).sum() for d in dummy))
        observed_norm = torch.sqrt(sum(o.pow(2).sum() for o in observed))
        return 1 - dot / (dummy_norm * observed_norm).clamp_min(1e-30)
    if weighting == "layer":
        terms = [1 - (d * o).sum() / (d.norm() * o.norm()).clamp_min(1e-30) for d, o in zip(dummy, observed)]
        return torch.stack(terms).mean()
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


@dataclass
class GradientInversionResult:
    """What :meth:`GradientInversion.invert` returns.

    Attributes:
        image: the reconstructed input ``(B, C, D, H, W)``.
        labels: the label probabilities used at the best restart ``(B, K, D, H, W)`` (the truth in ``"known"`` mode).
        stats: JSON-serializable settings, losses and seconds.
    """

    image: torch.Tensor
    labels: torch.Tensor
    stats: dict


class GradientInversion(Attack):
    """Reconstruct a training batch from the gradient (or update direction) it produced, knowing the model.

    Minimises over a dummy input ``x`` (and, in ``"joint"`` mode, label logits ``s``)::

        gradient_distance(grad_theta L(f(x), sigmoid(s)), observed) + tv_weight * TV(x)

    with Adam on the input's signed gradient and the learning rate cut tenfold at 3/8, 5/8 and 7/8 of the
    iterations, as Geiping et al. (or constant: ``decay=False``). ``x`` starts at the attacker's prior (the mean
    image of auxiliary crops at the same place, plus ``init_std`` noise) and the labels at the prior tumour
    frequency. Each of ``restarts`` runs starts from its own noise and keeps its iterate of lowest gradient distance
    (a signed step can overshoot on this objective); the restart whose distance is lowest wins. The attacker cannot
    see the truth, only how well the gradients match.

    Threat model: whoever reads one hospital's update (the FedAvg server) and knows the global weights the round
    started from (it sent them), the architecture, the loss and the batch size. Nothing about the hospital's data.

    Args:
        model: the global model the hospital started from; copied, never changed.
        loss_fn: the training loss ``loss_fn(logits, targets)`` (the job's ``make_loss("dice_ce")``).
        labels: ``"joint"`` or ``"known"`` (:data:`LABEL_MODES`).
        layers: regular expression; only parameters whose names match it (``re.match``) are compared. ``None``: all
            observed parameters.
        weighting: ``"global"`` or ``"layer"`` (:data:`WEIGHTINGS`).
        iterations: optimiser steps per restart.
        restarts: independent starts; the best by gradient distance is kept.
        lr: Adam's learning rate for the input (and the label logits).
        tv_weight: weight of the 3D total-variation prior on the input.
        init_std: std of the noise added to the prior at each start.
        signed: step on the sign of the input's gradient (Geiping et al.); ``False``: plain Adam.
        decay: cut the learning rate tenfold at 3/8, 5/8 and 7/8 of the iterations (Geiping et al.); ``False``: a
            constant rate (short budgets, where the cuts come after a handful of steps).
        seed: seed of the starting noise.
        device: where to optimise.

    Raises:
        ValueError: an unknown mode or weighting, or a bad number.
    """

    name = "gradient_inversion"
    threat_model = (
        "the server reads one hospital's weight update and knows the global weights, architecture, loss and batch size"
    )

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        labels: str = "joint",
        layers: str | None = None,
        weighting: str = "global",
        iterations: int = 40,
        restarts: int = 1,
        lr: float = 0.1,
        tv_weight: float = 0.01,
        init_std: float = 0.05,
        signed: bool = True,
        decay: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.device = torch.device(device)
        # A copy in training mode, as the hospital computed its update; its parameters' .grad are never filled
        # (backward is asked for the dummy's gradients only).
        self.model = copy.deepcopy(model).to(self.device).train()
        self.loss_fn = loss_fn
        self.labels = labels
        self.layers = re.compile(layers) if layers is not None else None
        self.weighting = weighting
        self.iterations = check_positive_int("iterations", iterations)
        self.restarts = check_positive_int("restarts", restarts)
        self.lr = check_positive("lr", lr)
        self.tv_weight = check_non_negative("tv_weight", tv_weight)
        self.init_std = check_non_negative("init_std", init_std)
        self.signed = bool(signed)
        self.decay = bool(decay)
        self.seed = int(seed)

    def _chosen(self, observed: Mapping[str, torch.Tensor]) -> tuple[list[nn.Parameter], list[torch.Tensor], list[str]]:
        parameters = dict(self.model.named_parameters())
        unknown = sorted(set(observed) - set(parameters))
        if unknown:
            raise ValueError(f"observed gradients name parameters the model lacks: {unknown[:3]}")
        names = [n for n in parameters if n in observed and (self.layers is None or self.layers.match(n))]
        if not names:
            raise ValueError("no observed parameter is selected (check `layers` against the model's parameter names)")
        for name in names:
            if tuple(observed[name].shape) != tuple(parameters[name].shape):
                shapes = tuple(observed[name].shape), tuple(parameters[name].shape)
                raise ValueError(f"{name}: observed gradient {shapes[0]}, parameter {shapes[1]}")
        targets = [observed[n].detach().float().to(self.device) for n in names]
        return [parameters[n] for n in names], targets, names

    def _distance(
        self, x: torch.Tensor, y: torch.Tensor, parameters: list[nn.Parameter], targets: list[torch.Tensor], graph: bool
    ) -> torch.Tensor:
        loss = self.loss_fn(self.model(x), y)
        dummy = torch.autograd.grad(loss, parameters, create_graph=graph)
        return gradient_distance(dummy, targets, self.weighting)

    def invert(
        self,
        observed: Mapping[str, torch.Tensor],
        batch_size: int,
        prior: torch.Tensor,
        label_prior: torch.Tensor | None = None,
        true_labels: torch.Tensor | None = None,
    ) -> GradientInversionResult:
        """Run the attack.

        Args:
            observed: parameter name -> observed gradient (or update direction), as the model names its parameters.
            batch_size: the hospital's batch size B (the attacker knows it from the job).
            prior: ``(1 or B, C, D, H, W)`` the attacker's mean image; sets the crop size.
            label_prior: ``(1 or B, K, D, H, W)`` tumour frequency per region of auxiliary label crops at the same
                place; needed in ``"joint"`` mode.
            true_labels: ``(B, K, D, H, W)`` true regions; needed (only) in ``"known"`` mode (the oracle).

        Returns:
            :class:`GradientInversionResult`.
        """
        start = time.perf_counter()
        check_positive_int("batch_size", batch_size)
        parameters, targets, names = self._chosen(observed)
        if not isinstance(prior, torch.Tensor) or prior.dim() != 5 or prior.shape[0] not in (1, batch_size):
            raise ValueError(f"prior must be a (1 or B, C, D, H, W) tensor for a batch of {batch_size}")
        prior = prior.detach().float().to(self.device).expand(batch_size, -1, -1, -1, -1)
        fixed_labels = self._fixed_labels(batch_size, prior, label_prior, true_labels)
        runs = []
        for restart in range(self.restarts):
            runs.append(self._run(restart, prior, label_prior, fixed_labels, parameters, targets))
        best = min(range(len(runs)), key=lambda index: runs[index][2])
        image, label_probabilities, _, first = runs[best]
        stats = {
            "attack": self.name,
            "labels": self.labels,
            "weighting": self.weighting,
            "layers": self.layers.pattern if self.layers is not None else None,
            "parameters_compared": len(names),
            "values_compared": int(sum(t.numel() for t in targets)),
            "iterations": self.iterations,
            "restarts": self.restarts,
            "lr": self.lr,
            "tv_weight": self.tv_weight,
            "signed": self.signed,
            "decay": self.decay,
            "gradient_distance_prior": first,
            "gradient_distance_restarts": [run[2] for run in runs],
            "best_restart": best,
            "gradient_distance": runs[best][2],
            "seconds": time.perf_counter() - start,
        }
        return GradientInversionResult(image.cpu(), label_probabilities.cpu(), stats)

    def reconstruct(
        self,
        observed: Mapping[str, torch.Tensor],
        crop_size: Sequence[int] | None = None,
        *,
        prior: torch.Tensor,
        batch_size: int = 1,
        label_prior: torch.Tensor | None = None,
        true_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """:meth:`invert` under the common attack contract: ``(image (B, C, D, H, W), stats)``.

        ``observed`` here maps parameter names (not levels) to gradients, and the image has the model's input
        channels; ``crop_size``, when given, must equal the prior's spatial size.
        """
        if crop_size is not None and tuple(int(s) for s in crop_size) != tuple(prior.shape[2:]):
            raise ValueError(f"crop_size {tuple(crop_size)} differs from the prior's {tuple(prior.shape[2:])}")
        result = self.invert(observed, batch_size, prior, label_prior=label_prior, true_labels=true_labels)
        return result.image, result.stats

    def _fixed_labels(
        self, batch: int, prior: torch.Tensor, label_prior: torch.Tensor | None, labels: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The true labels in ``"known"`` mode (checked), ``None`` in ``"joint"`` mode (the label prior checked)."""
        spatial = tuple(prior.shape[2:])
        if self.labels == "known":
            if labels is None or labels.dim() != 5 or labels.shape[0] != batch or tuple(labels.shape[2:]) != spatial:
                raise ValueError(f"labels='known' needs the true labels as (B={batch}, K, {spatial})")
            return labels.detach().float().to(self.device)
        if label_prior is None or label_prior.dim() != 5 or tuple(label_prior.shape[2:]) != spatial:
            raise ValueError(f"labels='joint' needs label_prior as (1 or B, K, {spatial})")
        return None

    def _run(
        self,
        restart: int,
        prior: torch.Tensor,
        label_prior: torch.Tensor | None,
        fixed_labels: torch.Tensor | None,
        parameters: list[nn.Parameter],
        targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + restart)
        noise = torch.randn(prior.shape, generator=generator).to(self.device)
        x = (prior + self.init_std * noise).requires_grad_(True)
        variables = [x]
        logits = None
        if fixed_labels is None:
            frequency = label_prior.detach().float().to(self.device).expand(prior.shape[0], -1, -1, -1, -1)
            logits = torch.logit(frequency.clamp(_LABEL_EPS, 1 - _LABEL_EPS)).clone().requires_grad_(True)
            variables.append(logits)
        current_labels = (lambda: fixed_labels) if logits is None else (lambda: torch.sigmoid(logits))
        optimizer = torch.optim.Adam(variables, lr=self.lr)
        fractions = (3 / 8, 5 / 8, 7 / 8) if self.decay else ()
        milestones = sorted({max(1, int(self.iterations * f)) for f in fractions})
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        first, best = None, (math.inf, None, None)
        for step in range(self.iterations + 1):
            optimizer.zero_grad(set_to_none=True)
            labels = current_labels()
            distance = self._distance(x, labels, parameters, targets, graph=step < self.iterations)
            value = float(distance.detach())
            first = value if first is None else first
            # The attacker keeps the iterate whose gradients match best: a step can overshoot on this objective.
            if value < best[0]:
                best = (value, x.detach().clone(), labels.detach().clone())
            if step == self.iterations:
                break
            objective = distance + self.tv_weight * total_variation_3d(x)
            # Only the dummy's gradients: the model's parameters keep no .grad.
            objective.backward(inputs=variables)
            if self.signed:
                x.grad.sign_()
            optimizer.step()
            schedule.step()
        if best[1] is None:  # every distance was NaN
            best = (math.inf, x.detach().clone(), current_labels().detach().clone())
        return best[1], best[2], best[0], first
