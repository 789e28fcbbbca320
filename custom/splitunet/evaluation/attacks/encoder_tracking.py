"""Encoder tracking: with the site's initial weights known, the server replays the site's training and stays
white-box.

The site's encoder starts from a seed (``SiteTrainer.build``); when the server knows it (the job's seed, or a
leaked private one: ``report.attacker_encoder_seed``), :class:`WhiteBoxInversion` applies at iteration 1 only,
because the site then steps its optimiser. But the server knows the optimiser's settings (the job config's
``learning_rate`` and ``weight_decay``; Adam, ``SiteTrainer.build``) and the gradients it sent, which are what
drive the site's update: the site minimises the surrogate ``sum_l <E_l(x), g_l>`` over its weights. The only
unknown in the update is the site's input ``x``, and that is what white-box inversion recovers. Replaying
invert -> weight gradient -> optimiser step per iteration keeps a tracked copy of the encoder close to the
site's. This is the "attacker replays the victim's updates" idea of gradient-based model tracking, as in
Pasquini et al., "Unleashing the Tiger: Inference Attacks on Split Learning" (CCS 2021), where the server
controls the training, here under an honest-but-curious server that only watches.

Instance normalisation helps the attacker: a reconstruction off by a positive affine intensity map gives
(nearly) the same features and, because the normalisation's backward pass removes the mean of the incoming
gradient, (nearly) the same weight gradient. Adam helps too: its first steps move every weight by about
``lr * sign(gradient)``, so the tracked update only needs the gradient's signs right.

Measured (``python -m splitunet.evaluation.attacks.attack_measurements tracking --iterations 40``: 32^3 FLAIR
crops, batch 1, lr 2e-3, 30-step x0 inversions, a fixed random decoder with DiceCE): the tracked encoder's
distance to the site's weights was 0.05 / 0.11 / 0.21 / 0.38 / 0.58 after 1 / 4 / 10 / 20 / 40 iterations,
against 1.8 / 4.7 / 7.9 / 10.3 / 10.8 for the attacker that keeps the initial weights; all of the tracked error is
in ``conv_0`` (0.58 vs 0.87 there), the deeper blocks replay exactly on the received features (see
:func:`replay_step`; differentiating the whole encoder at the reconstruction instead gave 3.76 vs 4.66 after 4
iterations). The relative x0 feature error stayed 0.004-0.04 for 6 iterations and 0.2-0.4 up to 40 (untracked:
0.5-0.9 from iteration 2 on, about 1 from 20). Inversion SSIM with the tracked weights: 0.76-0.82 in iterations
1-6, 0.65-0.70 to 10, 0.45-0.69 from 11 to 40; with the initial weights 0.76, then 0.59 at 4, 0.48 at 10,
0.23-0.37 from 17 on (the mean of all crops, the prior here, 0.0-0.27). So white-box does not end at iteration 1
when the seed is known: it degrades slowly, because only ``conv_0``'s gradient depends on the inversion.

Everything here is in-process torch: :func:`simulate_site_training` runs a real :class:`SiteEncoder` with the
site's optimiser on a sequence of crops (the ground truth a test scores against); :func:`track_encoder` is the
attacker, which sees only what the server sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from splitunet.evaluation.attacks.base import check_non_negative, check_positive, check_positive_int
from splitunet.evaluation.attacks.encoder_access import build_encoder
from splitunet.evaluation.attacks.white_box_inversion import WhiteBoxInversion
from splitunet.networks import SiteEncoder
from splitunet.networks.optimizer import make_optimizer
from splitunet.wire.model_config import SplitModelConfig

__all__ = [
    "SiteRun",
    "decoder_gradient_fn",
    "encoder_distance",
    "replay_step",
    "site_optimizer",
    "simulate_site_training",
    "track_encoder",
]

# The site's optimiser settings when the caller gives none: the job config's defaults (SplitModelConfig).
_DEFAULT_CONFIG = SplitModelConfig()

# level -> the gradient the server sends back for that level's features.
Gradients = dict[int, torch.Tensor]
GradientFn = Callable[[int, dict[int, torch.Tensor]], Gradients]


def site_optimizer(
    encoder: SiteEncoder,
    learning_rate: float = _DEFAULT_CONFIG.learning_rate,
    weight_decay: float = _DEFAULT_CONFIG.weight_decay,
) -> torch.optim.Optimizer:
    """The site's optimiser exactly as ``SiteTrainer.build`` makes it: AdamW with the job's rate and weight decay."""
    return make_optimizer(encoder.parameters(), learning_rate, weight_decay)


def _apply_gradients(encoder: SiteEncoder, optimizer: torch.optim.Optimizer, crops: torch.Tensor, grads: Gradients):
    """One site step, as ``SiteTrainer.backward``: back-propagate the sent gradients through the features of
    ``crops`` and step the optimiser. Returns the features (detached)."""
    encoder.train()
    outputs = encoder(crops)
    levels = sorted(grads)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward([outputs[level] for level in levels], [grads[level].to(outputs[level]) for level in levels])
    optimizer.step()
    return {level: out.detach() for level, out in enumerate(outputs)}


_BLOCKS = ("conv_0", "down_1", "down_2", "down_3", "down_4")


def replay_step(
    encoder: SiteEncoder,
    optimizer: torch.optim.Optimizer,
    reconstruction: torch.Tensor,
    received: Mapping[int, torch.Tensor],
    sent: Gradients,
    use_received_inputs: bool = True,
) -> None:
    """The attacker's copy of one site step: weight gradients of ``sum_l <E_l(x), g_l>``, then the optimiser step.

    With ``use_received_inputs`` (and every level below the deepest sent one received), each block ``down_l``
    is evaluated on the *received* features ``x_{l-1}`` instead of on features of the reconstruction: those are
    exactly what the site's block saw, so the weight gradients of ``down_1..down_4`` are exact up to the tracked
    weights' error, and only ``conv_0``'s gradient depends on the inverted input. The gradient arriving at each
    level is accumulated top-down (``G_l = g_l + J_{down_{l+1}}^T G_{l+1}``), the chain rule the site's single
    backward pass applies. Otherwise the plain surrogate on ``E(reconstruction)`` is differentiated.
    """
    encoder.train()
    optimizer.zero_grad(set_to_none=True)
    deepest = max(sent)
    if use_received_inputs and all(level in received for level in range(deepest)):
        arriving = sent[deepest].clone()
        for level in range(deepest, 0, -1):
            inputs = received[level - 1].detach().float().clone().requires_grad_(True)
            torch.autograd.backward(getattr(encoder, _BLOCKS[level])(inputs), arriving)
            arriving = inputs.grad + (sent[level - 1] if level - 1 in sent else 0)
        torch.autograd.backward(encoder.conv_0(reconstruction.detach()), arriving)
    else:
        outputs = encoder(reconstruction.detach())
        levels = sorted(sent)
        torch.autograd.backward([outputs[level] for level in levels], [sent[level] for level in levels])
    optimizer.step()


def encoder_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], prefix: str = "") -> float:
    """L2 distance between two encoder state dicts over the parameters whose names start with ``prefix``."""
    total = 0.0
    for name, value in a.items():
        if name.startswith(prefix) and value.is_floating_point():
            total += float((value.double() - b[name].double()).pow(2).sum())
    return total**0.5


@dataclass
class SiteRun:
    """What a simulated site's training produced.

    Attributes:
        observed: per iteration ``t = 1..T``, level -> the features the site sent (what the server holds).
        gradients: per iteration, level -> the gradient the server sent back for them.
        crops: per iteration, the crops the site encoded (ground truth, for scoring only).
        states: ``T + 1`` encoder state dicts: ``states[0]`` the initial one, ``states[t]`` after ``t`` updates.
    """

    observed: list[dict[int, torch.Tensor]] = field(default_factory=list)
    gradients: list[Gradients] = field(default_factory=list)
    crops: list[torch.Tensor] = field(default_factory=list)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _state(encoder: SiteEncoder) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in encoder.state_dict().items()}


def simulate_site_training(
    features: Sequence[int],
    crops: Sequence[torch.Tensor],
    gradient_fn: GradientFn,
    init_seed: int = 0,
    learning_rate: float = _DEFAULT_CONFIG.learning_rate,
    weight_decay: float = _DEFAULT_CONFIG.weight_decay,
    sent_levels: Iterable[int] = _DEFAULT_CONFIG.sent_levels,
) -> SiteRun:
    """Run a real site encoder with the site's optimiser over a sequence of crop batches.

    Args:
        features: the job's BasicUNet feature sizes.
        crops: one ``(B, 1, D, H, W)`` batch per iteration.
        gradient_fn: ``(iteration index from 0, {level: features}) -> {level: gradient}`` for the sent levels:
            the server's side (e.g. :func:`decoder_gradient_fn`).
        init_seed: the site's encoder seed (what the attacker is assumed to know).
        learning_rate: the job's Adam learning rate.
        weight_decay: the job's Adam weight decay.
        sent_levels: levels the site sends (the job's skip levels plus the bottleneck).

    Returns:
        the :class:`SiteRun`.
    """
    levels = tuple(sorted({int(level) for level in sent_levels}))
    encoder = build_encoder(features, seed=init_seed)
    optimizer = site_optimizer(encoder, learning_rate, weight_decay)
    run = SiteRun(states=[_state(encoder)])
    for step, batch in enumerate(crops):
        batch = batch.detach().float()
        with torch.no_grad():
            sent = {level: out for level, out in enumerate(encoder.train()(batch)) if level in levels}
        grads = gradient_fn(step, sent)
        if set(grads) != set(levels):
            raise ValueError(f"gradient_fn returned levels {sorted(grads)}, the site sent {list(levels)}")
        _apply_gradients(encoder, optimizer, batch, grads)
        run.observed.append(sent)
        run.gradients.append({level: grad.detach().clone() for level, grad in grads.items()})
        run.crops.append(batch)
        run.states.append(_state(encoder))
    return run


def decoder_gradient_fn(
    features: Sequence[int], targets: Sequence[torch.Tensor], seed: int = 0, loss: str = "dice_ce"
) -> GradientFn:
    """The server's side of the simulation: a fixed, freshly initialised :class:`ServerDecoder` for one site and the
    job's loss; iteration ``t``'s gradients are those of the loss on ``targets[t]`` w.r.t. the received features,
    as ``ServerTrainer.train_step`` computes them (``attack_setup.first_step_gradients`` for several sites).

    The decoder is kept fixed: the gradients' content does not matter to the replay, only that the server knows
    them (it computed them).
    """
    from splitunet.networks import ServerDecoder
    from splitunet.networks.losses import make_loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = ServerDecoder(1, tuple(int(f) for f in features))
    criterion = make_loss(loss)

    def gradients(step: int, received: dict[int, torch.Tensor]) -> Gradients:
        leaves = {level: t.detach().clone().requires_grad_(True) for level, t in received.items()}
        criterion(decoder([leaves]), targets[step]).backward()
        return {level: t.grad.detach() for level, t in leaves.items()}

    return gradients


@torch.no_grad()
def _x0_error(state: Mapping, truth_state: Mapping, features: Sequence[int], crops: torch.Tensor) -> float:
    """``||x0(state) - x0(truth)||^2 / ||x0(truth)||^2`` on ``crops`` (0: identical features, ~2: unrelated)."""
    mine = build_encoder(features, state).conv_0(crops)
    truth = build_encoder(features, truth_state).conv_0(crops)
    return float((mine - truth).pow(2).sum() / truth.pow(2).sum().clamp_min(1e-12))


def track_encoder(
    features: Sequence[int],
    initial_state: Mapping[str, torch.Tensor],
    observed: Sequence[Mapping[int, torch.Tensor]],
    gradients: Sequence[Mapping[int, torch.Tensor]],
    learning_rate: float = _DEFAULT_CONFIG.learning_rate,
    weight_decay: float = _DEFAULT_CONFIG.weight_decay,
    inversion: Mapping | None = None,
    truth_states: Sequence[Mapping[str, torch.Tensor]] | None = None,
    truth_crops: Sequence[torch.Tensor] | None = None,
    prior: torch.Tensor | Sequence[torch.Tensor] | None = None,
    compare_untracked: bool = True,
    use_received_inputs: bool = True,
) -> list[dict]:
    """Replay the site's training from the known initial weights and the sent gradients.

    At each iteration ``t``: invert the received features with the tracked encoder (:class:`WhiteBoxInversion`),
    take the weight gradient of ``sum_l <E_l(x_hat), g_l>`` at the reconstruction, and step a copy of the site's
    optimiser (Adam, the job's rate and decay) on the tracked encoder.

    Args:
        features: the job's BasicUNet feature sizes.
        initial_state: the site encoder's initial state dict (rebuilt from the known seed).
        observed: per iteration, level -> the received features.
        gradients: per iteration, level -> the gradients the server sent back for them.
        learning_rate: the job's Adam learning rate.
        weight_decay: the job's Adam weight decay.
        inversion: keyword arguments of :class:`WhiteBoxInversion` (default: x0, 60 iterations, ``tv_weight=0.1``).
        truth_states: for scoring only: the site's state dicts, ``truth_states[t]`` after ``t`` updates.
        truth_crops: for scoring only: the crops of each iteration.
        prior: for scoring only: the mean-image prior (``image_leakage``'s baseline), one for every iteration
            (a sequence, when each iteration has crops of its own) or one for all.
        compare_untracked: also invert each iteration with the initial weights (the attacker that does not
            track), for the SSIM comparison (doubles the cost).
        use_received_inputs: feed the received features to the deeper blocks (see :func:`replay_step`); ``False``
            differentiates the whole encoder at the reconstruction.

    Returns:
        one row per iteration: ``iteration`` (1-based), ``feature_loss`` (of the inversion); with
        ``truth_states``: ``distance`` (tracked vs site weights after the update), ``distance_untracked`` (initial
        vs site weights), ``distance_conv_0`` / ``distance_conv_0_untracked`` (the first block, which the x0
        inversion uses); with both truths: ``x0_error`` / ``x0_error_untracked``, the relative squared error of the
        x0 features of this iteration's crop (after the update) against the site's; with ``truth_crops`` and
        ``prior``: ``ssim`` (inversion with the tracked weights, i.e.
        before this iteration's update, as the attacker uses them), ``ssim_prior`` and ``ssim_untracked``.
    """
    from splitunet.evaluation.metrics import image_leakage

    if len(observed) != len(gradients):
        raise ValueError(f"observed ({len(observed)}) and gradients ({len(gradients)}) must cover the same iterations")
    learning_rate = check_positive("learning_rate", learning_rate)
    weight_decay = check_non_negative("weight_decay", weight_decay)
    settings = {"levels": [0], "iterations": 60, "lr": 0.1, "tv_weight": 0.1, "seed": 0, **dict(inversion or {})}
    check_positive_int("inversion iterations", settings["iterations"])
    tracked = build_encoder(features, initial_state)
    optimizer = site_optimizer(tracked, learning_rate, weight_decay)
    initial = _state(tracked)
    untracked_attack = WhiteBoxInversion(features, initial, **settings) if compare_untracked else None
    rows = []
    for step, (received, sent) in enumerate(zip(observed, gradients)):
        start = time.perf_counter()
        attack = WhiteBoxInversion(features, tracked.state_dict(), **settings)
        reconstruction, stats = attack.reconstruct(received)
        row = {"iteration": step + 1, "feature_loss": stats["feature_loss_last"]}
        if truth_crops is not None and prior is not None:
            truth = truth_crops[step]
            step_prior = prior if isinstance(prior, torch.Tensor) else prior[step]
            leakage = image_leakage(reconstruction, truth, step_prior)["mean"]
            row["ssim"], row["ssim_prior"] = leakage["ssim"], leakage["ssim_prior"]
            if untracked_attack is not None:
                naive, _ = untracked_attack.reconstruct(received)
                row["ssim_untracked"] = image_leakage(naive, truth, step_prior)["mean"]["ssim"]
        sent = {int(level): grad.detach().float() for level, grad in sent.items()}
        replay_step(
            tracked, optimizer, reconstruction, {int(k): v for k, v in received.items()}, sent, use_received_inputs
        )
        if truth_states is not None:
            truth_state = truth_states[step + 1]
            mine = tracked.state_dict()
            row["distance"] = encoder_distance(mine, truth_state)
            row["distance_untracked"] = encoder_distance(initial, truth_state)
            row["distance_conv_0"] = encoder_distance(mine, truth_state, "conv_0.")
            row["distance_conv_0_untracked"] = encoder_distance(initial, truth_state, "conv_0.")
            if truth_crops is not None:
                # What inversion depends on: how far the tracked x0 features are from the site's on the same crop.
                row["x0_error"] = _x0_error(mine, truth_state, features, truth_crops[step])
                row["x0_error_untracked"] = _x0_error(initial, truth_state, features, truth_crops[step])
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows
