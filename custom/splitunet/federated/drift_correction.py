"""Corrections for client drift in federated and split-federated training: DWCS on the server, FedProx at a site.

DWCS (dynamic weight correction strategy, Yang et al., RoS-FL and its follow-up DC-SFL) runs after the averaging
of round ``r``, once per averaged model part (``"head"``, ``"tail"``, ``"encoder/flair"``, ...). With ``w`` the
part's averaged state of round ``r`` and ``p`` its averaged state of the previous round::

    alpha_r = min(1 - 1 / (r + 1), alpha_max)                 (or a fixed alpha)
    c       = w after `steps` Adam steps on  L(c) = (mu / 2) * ||c - p||^2,  started fresh from c = w
    result  = (1 - alpha_r) * w + alpha_r * c                  (computed as w + alpha_r * (c - w))

Round 0, and the first round a part is seen, return ``w`` unchanged: there is no previous model. ``alpha = 0``
returns ``w`` exactly, i.e. plain FedAvg. The reference ``p`` is kept by the :class:`DriftCorrection` object for
each part separately: in the authors' code the client-side parts were compared with themselves, which made the
correction a no-op there; here every averaged part is pulled towards its own previous round.

What one Adam step does here. A fresh Adam's first update is ``lr * g / (|g| + eps)`` element-wise (the bias
corrections cancel its moment estimates down to ``g`` and ``|g|``), and here ``g = mu * d`` with ``d = w - p``.
So ``mu`` does not scale the pull: Adam normalises it away, and ``mu`` survives only in ``tau = eps / mu``. For a
single step the correction has a closed form, per element::

    result - p = d * (1 - alpha_r * lr / (|d| + tau))

Each parameter's change since the previous round is shrunk: changes much larger than ``tau`` lose about
``alpha_r * lr`` (a fixed-size step towards ``p``, whatever their size: sign descent), changes much smaller than
``tau`` are scaled by ``1 - alpha_r * lr / tau``. With ``mu = 1e-4`` and torch's ``eps = 1e-8``,
``tau = 1e-4``. Tensors equal to the previous round's do not move (``g = 0``); integer tensors are never changed.

Defaults. ``mu = 1e-4``, ``alpha_max = 0.99`` and one step, as in the authors' code. ``learning_rate`` defaults to
``tau = eps / mu`` (1e-4): the largest rate at which, whatever alpha, no element can pass its previous value (the
factor above stays in ``[0, 1]``), so the result always lies between ``w`` and ``p`` element-wise (a variance buffer
stays positive, nothing oscillates between rounds). Then a large change loses at most ``alpha_r * 1e-4``, a
twentieth of one local Adam step at this package's learning rate of 2e-3, so a round's real progress is kept, while
changes far below ``tau`` (parameters that the sites moved in opposite directions, which averaging reduced to noise)
shrink to about ``1 - alpha_r`` of their size (0.01 from round 99 on). The price: a parameter that moves steadily
but by less than ``tau`` per round is slowed down just as much as noise is. A larger rate or ``steps > 1`` (Adam's
momentum) gives up the guarantee and can overshoot ``p``.

FedProx (Li et al., 2020) instead acts at the site, during local training: :func:`proximal_term` is added to the
local loss and pulls the site's weights towards the global ones it started from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Integral, Real

import torch
from torch import nn

__all__ = ["DriftCorrection", "proximal_term"]


class DriftCorrection:
    """DWCS for every averaged model part: pulls each part towards its own averaged state of the previous round.

    One object serves all parts of a run; it keeps, per part, the averaged state of the latest round it saw
    (and of the round before, so that a retried round is corrected against the same reference again). The
    formula, its one-step closed form and the choice of defaults are in the module docstring.

    Args:
        mu: > 0, weight of the proximal loss ``(mu / 2) * ||c - p||^2``. Under Adam it only sets ``eps / mu``.
        learning_rate: > 0, Adam's learning rate; ``None`` (default) takes ``adam_eps / mu``, the largest rate
            at which one step never overshoots the previous round's state.
        steps: Adam steps per correction, >= 1.
        alpha_max: cap of the schedule ``alpha_r = min(1 - 1 / (r + 1), alpha_max)``, in ``[0, 1]``.
        alpha: a fixed weight in ``[0, 1]`` instead of the schedule; ``0`` is plain FedAvg.
        adam_eps: Adam's ``eps``.
        adam_betas: Adam's ``betas``.

    Example::

        correction = DriftCorrection()
        for round_index in range(num_rounds):
            ...
            head = correction.apply(weighted_average(head_states, case_counts), round_index, part="head")
    """

    def __init__(
        self,
        mu: float = 1e-4,
        learning_rate: float | None = None,
        steps: int = 1,
        alpha_max: float = 0.99,
        alpha: float | None = None,
        adam_eps: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.999),
    ):
        self.mu = _positive("mu", mu)
        self.adam_eps = _positive("adam_eps", adam_eps)
        self.learning_rate = (
            self.adam_eps / self.mu if learning_rate is None else _positive("learning_rate", learning_rate)
        )
        if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = int(steps)
        self.alpha_max = _unit("alpha_max", alpha_max)
        self.alpha = None if alpha is None else _unit("alpha", alpha)
        betas = tuple(adam_betas)
        if len(betas) != 2 or not all(isinstance(b, Real) and 0 <= b < 1 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        # part -> (round, averaged state) of the latest round seen, and of the round before it.
        self._latest: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self._previous: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}

    @property
    def parts(self) -> list[str]:
        """The parts that have a stored state, in the order they were first seen."""
        return list(self._latest)

    def alpha_at(self, round_index: int) -> float:
        """The weight of the corrected copy after round ``round_index`` (0 in round 0)."""
        round_index = _round(round_index)
        if round_index == 0:
            return 0.0
        if self.alpha is not None:
            return self.alpha
        return min(1.0 - 1.0 / (round_index + 1), self.alpha_max)

    def apply(
        self, averaged_state: Mapping[str, torch.Tensor], round_index: int, part: str = "model"
    ) -> dict[str, torch.Tensor]:
        """Correct one part's averaged state of round ``round_index`` and remember it for the next round.

        Args:
            averaged_state: the part's state dict after averaging (e.g. from
                :func:`~splitunet.federated.averaging.weighted_average`).
            round_index: the round just averaged, >= 0. Per part it must not decrease; the same round again
                (a retried round) is corrected against the same previous round.
            part: which model part this is; each part has its own reference.

        Returns:
            a new state dict with the same keys, shapes, dtypes and devices. Unchanged values (copies) in round 0,
            when the part has no earlier round, or when ``alpha`` is 0.

        Raises:
            ValueError: if ``round_index`` is negative or lower than the part's latest round, or if the state's
                keys or shapes differ from the part's previous state.
        """
        round_index = _round(round_index)
        if not isinstance(part, str) or not part:
            raise ValueError(f"part must be a non-empty string, got {part!r}")
        state = {key: _tensor(key, value).detach().clone() for key, value in averaged_state.items()}

        latest = self._latest.get(part)
        if latest is not None and round_index < latest[0]:
            raise ValueError(f"part {part!r}: round {round_index} comes after round {latest[0]}")
        # A new round makes the latest one the reference; a retried round keeps the reference it had.
        previous = latest if latest is not None and round_index > latest[0] else self._previous.get(part)
        if previous is not None:
            _check_matches(part, state, previous[1])  # before storing anything: a bad state changes nothing
            self._previous[part] = previous
        self._latest[part] = (round_index, state)

        alpha = self.alpha_at(round_index)
        if previous is None or alpha == 0.0:
            return {key: value.clone() for key, value in state.items()}
        return self._correct(state, previous[1], alpha)

    def _correct(
        self, state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        floating = [key for key, value in state.items() if value.is_floating_point()]
        # Adam runs in at least float32: half-precision moments would underflow for the tiny gradients mu * d.
        copies = {
            key: state[key].to(torch.promote_types(state[key].dtype, torch.float32), copy=True) for key in floating
        }
        targets = {key: reference[key].to(device=copies[key].device, dtype=copies[key].dtype) for key in floating}
        corrected = {key: value.clone() for key, value in state.items()}
        if not floating:
            return corrected
        optimiser = torch.optim.Adam(
            list(copies.values()), lr=self.learning_rate, betas=self.adam_betas, eps=self.adam_eps
        )
        for _ in range(self.steps):
            # The gradient of (mu / 2) * ||c - p||^2, written out: no autograd graph, so a state made under
            # torch.inference_mode or no_grad works too.
            for key, copy in copies.items():
                copy.grad = self.mu * (copy.detach() - targets[key])
            optimiser.step()
        with torch.no_grad():
            for key in floating:
                wide = state[key].to(torch.float64)
                moved = copies[key].detach().to(torch.float64)
                corrected[key] = (wide + alpha * (moved - wide)).to(state[key].dtype)
        return corrected

    def describe(self) -> dict:
        """The settings, JSON-ready, for a run's ``results.json``."""
        return {
            "method": "DWCS",
            "formula": "result = (1 - alpha_r) * w + alpha_r * Adam^steps(w; (mu/2) * ||c - p||^2), "
            "p = the part's averaged state of the previous round",
            "alpha_schedule": "min(1 - 1/(r+1), alpha_max)" if self.alpha is None else "fixed",
            "alpha": self.alpha,
            "alpha_max": self.alpha_max,
            "mu": self.mu,
            "learning_rate": self.learning_rate,
            "steps": self.steps,
            "adam_eps": self.adam_eps,
            "adam_betas": list(self.adam_betas),
            "tau": self.adam_eps / self.mu,
            "one_step_closed_form": "result - p = d * (1 - alpha_r * lr / (|d| + tau)), d = w - p, tau = eps / mu",
        }

    def state_dict(self) -> dict:
        """The stored states per part, for a checkpoint (``torch.save`` it); see :meth:`load_state_dict`."""
        stored = {}
        for part, (round_index, state) in self._latest.items():
            stored[part] = {"latest": (round_index, state)}
            if part in self._previous:
                stored[part]["previous"] = self._previous[part]
        return {"settings": self.describe(), "parts": stored}

    def load_state_dict(self, saved: Mapping) -> None:
        """Restore what :meth:`state_dict` returned (a resumed run then corrects its next round as before)."""
        self._latest, self._previous = {}, {}
        for part, entry in saved["parts"].items():
            round_index, state = entry["latest"]
            self._latest[part] = (int(round_index), {k: v.detach().clone() for k, v in state.items()})
            if "previous" in entry:
                round_index, state = entry["previous"]
                self._previous[part] = (int(round_index), {k: v.detach().clone() for k, v in state.items()})

    def reset(self, part: str | None = None) -> None:
        """Forget the stored states of ``part`` (or of every part): its next round is not corrected."""
        for stored in (self._latest, self._previous):
            if part is None:
                stored.clear()
            else:
                stored.pop(part, None)


def proximal_term(
    module_or_params: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    global_state: Mapping[str, torch.Tensor],
    mu: float,
) -> torch.Tensor:
    """FedProx's proximal term ``(mu / 2) * sum ||w - w_global||^2``, to add to a site's local loss.

    The sum runs over the trainable parameters (``requires_grad``) whose names are in ``global_state``; buffers
    and other names in ``global_state`` are ignored, and so are the site's parameters that ``global_state`` does
    not name (layers that are not averaged). The global values are constants: the gradient with respect to ``w``
    is ``mu * (w - w_global)``. Pass ``global_state`` on the module's device to avoid a copy at every call.

    Args:
        module_or_params: a module, a mapping name -> parameter, or ``(name, parameter)`` pairs (such as
            ``module.named_parameters()``).
        global_state: the state the site started the round from (names as in ``module.state_dict()``).
        mu: finite, >= 0.

    Returns:
        a differentiable scalar on the parameters' device and dtype; 0 when the parameters equal the global ones.

    Raises:
        ValueError: if ``mu`` is invalid, no trainable parameter is named in ``global_state`` (say, names with a
            ``module.`` prefix on one side only), or a named parameter's shape differs.
    """
    if isinstance(mu, bool) or not isinstance(mu, Real) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    if isinstance(module_or_params, nn.Module):
        named = module_or_params.named_parameters()
    elif isinstance(module_or_params, Mapping):
        named = module_or_params.items()
    else:
        named = module_or_params
    total = None
    for name, parameter in named:
        if not parameter.requires_grad or name not in global_state:
            continue
        anchor = _tensor(name, global_state[name]).detach()
        if anchor.shape != parameter.shape:
            raise ValueError(
                f"{name!r}: parameter has shape {tuple(parameter.shape)}, global state {tuple(anchor.shape)}"
            )
        squared = (parameter - anchor.to(device=parameter.device, dtype=parameter.dtype)).pow(2).sum()
        total = squared if total is None else total + squared
    if total is None:
        raise ValueError("no trainable parameter is named in global_state (do the names match state_dict()'s?)")
    return 0.5 * float(mu) * total


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _round(round_index) -> int:
    if isinstance(round_index, bool) or not isinstance(round_index, Integral) or round_index < 0:
        raise ValueError(f"round_index must be an int >= 0, got {round_index!r}")
    return int(round_index)


def _tensor(key: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{key!r} is a {type(value).__name__}, not a torch.Tensor")
    return value


def _check_matches(part: str, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    if set(state) != set(reference):
        missing, extra = set(reference) - set(state), set(state) - set(reference)
        raise ValueError(
            f"part {part!r} has other keys than in its previous round: missing {sorted(missing)[:5]}, "
            f"extra {sorted(extra)[:5]}"
        )
    for key, value in state.items():
        if value.shape != reference[key].shape:
            raise ValueError(
                f"part {part!r}: {key!r} has shape {tuple(value.shape)}, {tuple(reference[key].shape)} before"
            )
