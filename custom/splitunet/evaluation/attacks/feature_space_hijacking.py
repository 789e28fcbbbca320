"""Feature-space hijacking (FSHA): a malicious server that trains the site's encoder into a feature space it can invert.

Pasquini, Ateniese and Bernaschi, "Unleashing the Tiger: Inference Attacks on Split Learning", ACM CCS 2021
(reference code: github.com/pasquini-dario/SplitNN_FSHA, ``FSHA.py``). The server never runs the task it
claims to run. Instead it trains, on auxiliary images of the site's modality,

- a *pilot* encoder ``f~`` (here a :class:`~splitunet.networks.SiteEncoder` of the site's architecture, with its
  own weights) together with its inverse ``f~^-1`` (an :class:`~splitunet.evaluation.attacks.InverseDecoder`) as
  an autoencoder, so that ``f~``'s feature space is invertible by construction, and
- a critic ``D`` (:class:`HijackCritic`) that tells ``f~``'s features of auxiliary crops from the site's
  features of its private crops (Wasserstein loss with gradient penalty, as the reference's ``WGAN`` setting),

and returns to the site, in place of honest gradients, ``d mean(D(z_private)) / d z_private``: the direction that
makes the site's features look like the pilot's. The site's own optimiser then walks its encoder into the pilot's
feature space, where ``f~^-1`` decodes the private crops.

Adaptation to the 3D split U-Net. A site sends a pyramid of levels (skips x0..x3 and the bottleneck x4, as its
``SplitModelConfig.sent_levels``) and must get a gradient back for each. Which levels to hijack:

- every level the site sends (the default): the critic sees the whole pyramid, the inverse decodes it with all
  skips, and every returned level carries a critic gradient, so no level is conspicuously zero. The full
  resolution x0 dominates the reconstruction: it is one ``TwoConv`` block away from the image, so it is also the
  level the hijack reaches first;
- ``levels=(4,)``, the bottleneck only: the attack for a site that sends no skips (``skip_levels=()``, or a
  ``BlockSkipLevels`` filter); the inverse must then rebuild 32^3 voxels from 2^3 x 128 values, which needs far
  more auxiliary data and iterations than the CI sizes give (see "Budget" below);
- any subset: the levels not hijacked get zero gradients, which keeps those parts of the site encoder unchanged.

Everything runs in one process, with no FLARE: a simulated site (:class:`SimulatedSite`, the real
:class:`~splitunet.networks.SiteEncoder` with ``SiteTrainer``'s Adam settings from the model config) encodes a
sequence of its private crops, the attacker (:class:`FeatureSpaceHijacking`) answers each with its malicious
gradients, and the site applies them unless a gate (e.g. the site-side ``GradientDetector``) refuses them.

Budget. The paper trains for 10^4..10^5 iterations at lr 1e-5 on 2D images of 32x32..64x64. Here a site's Adam
runs at the job's lr (2e-3 by default), which makes the hijack visible within tens of iterations: on the shipped
architecture, every level hijacked, batch 1, 32^3 phantom crops, the reconstruction SSIM went 0.15 -> 0.27 (10
iterations) -> 0.62 (25) -> 0.62 (40) against a prior of 0.30 (the pilot's own ceiling 0.81; about 1.5 s per
iteration on one CPU thread). With a narrow encoder (4..64 features), x0 alone and 12..16 iterations, the rise
is seed-dependent (0.15 -> 0.51 or no rise at all): CI sizes test the mechanics, not the reconstruction. Real
sizes (128^3 crops, the bottleneck alone) need the paper's budget: thousands of iterations and hundreds of
auxiliary crops, on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from splitunet.evaluation.attacks.base import (
    Attack,
    check_levels,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from splitunet.evaluation.attacks.encoder_access import EncoderPrefix
from splitunet.evaluation.attacks.learned_inverse import InverseDecoder
from splitunet.evaluation.attacks.observed import check_observed, resolve_crop_size
from splitunet.networks import SiteEncoder
from splitunet.networks.optimizer import make_optimizer
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import NUM_LEVELS

__all__ = ["HijackCritic", "FeatureSpaceHijacking", "SimulatedSite", "GradientGate", "run_fsha"]

# Gate on the gradients a site receives: (iteration, level -> gradient) -> None to apply them, or the reason to
# refuse them (a site-side detector). A refusal ends the simulated run, as a refused task ends a FLARE run.
GradientGate = Callable[[int, Mapping[int, torch.Tensor]], "str | None"]


class HijackCritic(nn.Module):
    """The FSHA discriminator on a feature pyramid: one score per sample, higher for the site's features.

    Climbs from the finest to the coarsest chosen level: at each level a 3x3x3 convolution with LeakyReLU(0.2)
    over the running state concatenated with that level's features (where chosen), then 2x average pooling (the
    encoder's pooling halves by floor too); a spatial mean and a linear layer give the score. No normalisation
    layers: the gradient penalty of WGAN-GP is per sample (Gulrajani et al., NeurIPS 2017).

    Args:
        features: the encoder's feature sizes (at least five).
        levels: levels the critic reads.
        width: hidden channels.
    """

    def __init__(self, features: Sequence[int], levels: Iterable[int], width: int = 16):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < NUM_LEVELS:
            raise ValueError(f"features must hold at least {NUM_LEVELS} ints, got {features}")
        chosen = check_levels(levels)
        if chosen is None:
            raise ValueError("levels must name at least one level")
        self.levels = chosen
        width = check_positive_int("width", width)
        self.convs = nn.ModuleDict()
        for level in range(self.levels[0], self.levels[-1] + 1):
            incoming = (width if level > self.levels[0] else 0) + (features[level] if level in self.levels else 0)
            self.convs[str(level)] = nn.Conv3d(incoming, width, kernel_size=3, padding=1)
        self.score = nn.Linear(width, 1)

    def forward(self, pyramid: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``pyramid``: level -> ``(B, features[level], ...)`` for :attr:`levels` -> scores ``(B,)``."""
        h = None
        for level in range(self.levels[0], self.levels[-1] + 1):
            if h is not None:
                h = F.avg_pool3d(h, 2)
            parts = ([h] if h is not None else []) + ([pyramid[level]] if level in self.levels else [])
            h = F.leaky_relu(self.convs[str(level)](torch.cat(parts, dim=1)), 0.2)
        return self.score(h.mean(dim=(2, 3, 4))).squeeze(1)


class SimulatedSite:
    """A site's encoder and optimiser as ``SiteTrainer.build`` makes them, without folders or FLARE.

    ``forward`` keeps the graph of the features it returns (detached copies, as on the wire); ``backward`` applies
    the gradients the server sent exactly as ``SiteTrainer.backward`` does (one ``autograd.backward`` over the
    sent levels, one Adam step).

    Args:
        config: the job's model settings (features, sent levels, Adam lr and weight decay).
        modality: the site's modality (offsets the initialisation seed, as ``initial_encoder``).
        init_seed: the site's own initialisation seed (``None``: derived from ``config.seed``).
    """

    def __init__(self, config: SplitModelConfig, modality: str = "flair", init_seed: int | None = None):
        # Imported here: the site package is the training path's; the evaluation side only borrows its builder.
        from splitunet.site.trainer import initial_encoder

        self.config = config
        with torch.random.fork_rng(devices=[]):
            self.encoder = initial_encoder(config, modality, init_seed)
        self.optimizer = make_optimizer(self.encoder.parameters(), config.learning_rate, config.weight_decay)
        self.levels = tuple(config.sent_levels)
        self._pending: dict[int, torch.Tensor] | None = None
        self.steps_applied = 0

    def forward(self, crops: torch.Tensor) -> dict[int, torch.Tensor]:
        """Encode ``crops`` ``(B, 1, D, H, W)`` for training; returns the sent levels, detached."""
        self.encoder.train()
        features = self.encoder(crops)
        self._pending = {level: features[level] for level in self.levels}
        return {level: t.detach().clone() for level, t in self._pending.items()}

    def backward(self, grads: Mapping[int, torch.Tensor]) -> None:
        """Apply the server's gradients to the pending features (one optimiser step)."""
        if self._pending is None:
            raise RuntimeError("backward without a pending forward")
        levels = list(self._pending)
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward([self._pending[level] for level in levels], [grads[level] for level in levels])
        self.optimizer.step()
        self._pending = None
        self.steps_applied += 1

    def discard(self) -> None:
        """Drop the pending graph without an update (the site refused the gradients)."""
        self._pending = None

    @torch.no_grad()
    def encode(self, crops: torch.Tensor) -> dict[int, torch.Tensor]:
        """The sent levels of ``crops`` with the current weights, no graph."""
        self.encoder.eval()
        features = self.encoder(crops)
        return {level: features[level] for level in self.levels}


class FeatureSpaceHijacking(Attack):
    """The malicious server of FSHA: pilot encoder, its inverse, and the critic, trained while the site trains.

    Call :meth:`server_step` once per training iteration with the features the site sent and a batch of
    auxiliary crops; it returns the gradients to send back. :meth:`reconstruct` decodes observed features with the
    pilot's inverse (the attack's output at any time).

    Args:
        features: the job's encoder feature sizes.
        sent_levels: levels the site sends (each needs a gradient back).
        levels: levels to hijack (``None``: every sent level; see the module docstring).
        width: hidden channels of the inverse decoder and of the critic.
        lr_pilot: Adam lr of the pilot encoder and its inverse (the reference uses 1e-5 over 10^4+ steps).
        lr_critic: Adam lr of the critic.
        gradient_penalty: weight of the WGAN-GP penalty.
        critic_steps: critic updates per iteration (on the same pair of batches).
        seed: seed of the attacker's initialisations and of the penalty's interpolation.
    """

    name = "feature_space_hijacking"
    threat_model = (
        "malicious server: returns adversarial gradients instead of honest ones; holds auxiliary images of the "
        "modality and knows the encoder architecture"
    )

    def __init__(
        self,
        features: Sequence[int],
        sent_levels: Iterable[int] = tuple(range(NUM_LEVELS)),
        levels: Iterable[int] | None = None,
        width: int = 16,
        lr_pilot: float = 1e-3,
        lr_critic: float = 1e-3,
        gradient_penalty: float = 10.0,
        critic_steps: int = 1,
        seed: int = 0,
    ):
        self.features = tuple(int(f) for f in features)
        sent = check_levels(sent_levels)
        if sent is None:
            raise ValueError("sent_levels must name at least one level")
        self.sent_levels = sent
        self.levels = sent if levels is None else check_levels(levels)
        if not set(self.levels) <= set(self.sent_levels):
            raise ValueError(f"levels {list(self.levels)} must be among the sent levels {list(self.sent_levels)}")
        self.lr_pilot = check_positive("lr_pilot", lr_pilot)
        self.lr_critic = check_positive("lr_critic", lr_critic)
        self.gradient_penalty = check_non_negative("gradient_penalty", gradient_penalty)
        self.critic_steps = check_positive_int("critic_steps", critic_steps)
        self.seed = int(seed)
        with torch.random.fork_rng(devices=[]):
            # The pilot must not share the site's initialisation: the server knows config.seed, and a site with
            # that seed would start already hijacked. An offset seed gives an unrelated feature space.
            torch.manual_seed(10_000 + self.seed)
            self.pilot = SiteEncoder(1, self.features)
            self.inverse = InverseDecoder(self.features, self.levels, width)
            self.critic = HijackCritic(self.features, self.levels, width)
        # Only the pilot's blocks up to the deepest hijacked level train (and cost time): deeper ones feed nothing.
        self.pilot_prefix = EncoderPrefix(self.pilot, self.levels)
        self.pilot_optimizer = torch.optim.Adam(
            list(self.pilot_prefix.parameters()) + list(self.inverse.parameters()), lr=self.lr_pilot
        )
        # Adam with beta1 = 0.5 for the critic, as WGAN-GP's reference settings use for stability.
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.lr_critic, betas=(0.5, 0.9))
        self.generator = torch.Generator().manual_seed(self.seed)
        self.iterations = 0
        self.last: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------- training
    def _pilot_pyramid(self, crops: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.pilot_prefix(crops)

    def _pilot_step(self, public: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """One autoencoder step of the pilot and its inverse on auxiliary crops; returns (pilot features, MSE)."""
        self.pilot.train()
        self.inverse.train()
        pilot_features = self._pilot_pyramid(public)
        pilot_mse = F.mse_loss(self.inverse(pilot_features, tuple(int(s) for s in public.shape[2:])), public)
        self.pilot_optimizer.zero_grad(set_to_none=True)
        pilot_mse.backward()
        self.pilot_optimizer.step()
        return pilot_features, pilot_mse

    def pretrain(self, draw_public: Callable[[], torch.Tensor], steps: int) -> float:
        """Train the pilot autoencoder alone before the site joins (the server holds its auxiliary data already).

        Not in the reference, which trains everything together from the first iteration; a head start shortens
        the attack at small budgets, as the site's first gradients then already point to an invertible space.

        Returns:
            the last step's MSE (NaN for 0 steps).
        """
        mse = torch.tensor(float("nan"))
        for _ in range(int(steps)):
            _, mse = self._pilot_step(draw_public())
        return float(mse.detach())

    def _penalty(self, private: Mapping[int, torch.Tensor], public: Mapping[int, torch.Tensor]) -> torch.Tensor:
        batch = min(next(iter(private.values())).shape[0], next(iter(public.values())).shape[0])
        mix = torch.rand(batch, generator=self.generator).reshape(batch, 1, 1, 1, 1)
        blended = {
            level: (mix * private[level][:batch] + (1 - mix) * public[level][:batch]).requires_grad_(True)
            for level in self.levels
        }
        scores = self.critic(blended)
        grads = torch.autograd.grad(scores.sum(), [blended[level] for level in self.levels], create_graph=True)
        norms = torch.sqrt(sum(g.reshape(batch, -1).pow(2).sum(1) for g in grads) + 1e-12)
        return ((norms - 1) ** 2).mean()

    def server_step(self, received: Mapping[int, torch.Tensor], public: torch.Tensor) -> dict[int, torch.Tensor]:
        """One FSHA iteration at the server (the reference's ``train_step``, server side).

        Args:
            received: level -> the site's features of its private crops, as sent (every sent level).
            public: a batch of auxiliary crops ``(B', 1, D, H, W)``.

        Returns:
            level -> the gradient to send back, for every sent level (zeros where not hijacked).
        """
        missing = sorted(set(self.sent_levels) - set(received))
        if missing:
            raise ValueError(f"the site must send levels {list(self.sent_levels)}; {missing} are missing")
        private = {level: received[level].detach().float().clone().requires_grad_(True) for level in self.levels}
        # 1. The site's "loss": the critic's score of its features; the site descends it (reference: f_loss).
        self.critic.eval()
        site_loss = self.critic(private).mean()
        grads = torch.autograd.grad(site_loss, [private[level] for level in self.levels])
        returned = {level: torch.zeros_like(received[level]) for level in self.sent_levels}
        returned.update({level: g.detach().to(received[level].dtype) for level, g in zip(self.levels, grads)})
        # 2. The pilot autoencoder on auxiliary crops: its feature space is invertible by construction.
        pilot_features, pilot_mse = self._pilot_step(public)
        # 3. The critic: low scores for the pilot's features, high for the site's (reference: D_loss with GP).
        self.critic.train()
        fixed_public = {level: t.detach() for level, t in pilot_features.items()}
        fixed_private = {level: t.detach() for level, t in private.items()}
        for _ in range(self.critic_steps):
            gap = self.critic(fixed_public).mean() - self.critic(fixed_private).mean()
            loss = gap
            if self.gradient_penalty:
                loss = loss + self.gradient_penalty * self._penalty(fixed_private, fixed_public)
            self.critic_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.critic_optimizer.step()
        self.iterations += 1
        self.last = {
            "site_loss": float(site_loss.detach()),
            "pilot_mse": float(pilot_mse.detach()),
            "critic_gap": float(gap.detach()),
        }
        return returned

    # ---------------------------------------------------------------------------------------------- attack
    @torch.no_grad()
    def reconstruct(
        self, observed: Mapping[int | str, torch.Tensor], crop_size: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Decode observed features with the pilot's inverse.

        Args:
            observed: level -> ``(B, C, D, H, W)``; must hold every hijacked level.
            crop_size: crop size ``(D, H, W)``; inferred from the levels when omitted.

        Returns:
            ``(reconstruction (B, 1, D, H, W), stats)``.
        """
        start = time.perf_counter()
        observed = check_observed(observed)
        missing = sorted(set(self.levels) - set(observed))
        if missing:
            raise ValueError(f"the hijacked levels are {list(self.levels)}; levels {missing} are missing")
        size = resolve_crop_size(observed, crop_size)
        self.inverse.eval()
        reconstruction = self.inverse({level: observed[level] for level in self.levels}, size)
        stats = {
            "attack": self.name,
            "levels": list(self.levels),
            "server_iterations": self.iterations,
            "seconds": time.perf_counter() - start,
        }
        return reconstruction, stats

    @torch.no_grad()
    def pilot_reconstruction(self, crops: torch.Tensor) -> torch.Tensor:
        """``inverse(pilot(crops))``: what a perfectly hijacked site would give away (the attack's ceiling)."""
        self.pilot.eval()
        self.inverse.eval()
        return self.inverse(self._pilot_pyramid(crops), tuple(int(s) for s in crops.shape[2:]))


def _batches(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> Callable[[], torch.Tensor]:
    """A sampler of ``batch_size`` crops drawn with replacement."""

    def draw() -> torch.Tensor:
        return images[torch.randint(len(images), (batch_size,), generator=generator)]

    return draw


def run_fsha(
    private: torch.Tensor,
    auxiliary: torch.Tensor,
    target: torch.Tensor,
    prior: torch.Tensor,
    iterations: int = 30,
    eval_every: int = 5,
    batch_size: int = 1,
    config: SplitModelConfig | None = None,
    levels: Iterable[int] | None = None,
    attack_options: Mapping | None = None,
    site_seed: int | None = None,
    seed: int = 0,
    gate: GradientGate | None = None,
    pretrain_steps: int = 0,
) -> dict:
    """Simulate a site trained by an FSHA server and measure the reconstruction of ``target`` over iterations.

    Each iteration: the site encodes ``batch_size`` of its ``private`` crops (drawn with replacement), the server
    answers with :meth:`FeatureSpaceHijacking.server_step` on as many ``auxiliary`` crops, ``gate`` (if any) sees
    the gradients, and the site applies them; a refusal ends the run there (a ``FilterRejection`` becomes the
    task's error and stops the server's workflow), so the site's encoder, and the curve, freeze. Every
    ``eval_every`` iterations (and at 0) the server decodes the site's current features of ``target`` and the row
    records SSIM against the prior.

    Args:
        private: the site's private crops ``(N, 1, D, H, W)`` (its training sequence).
        auxiliary: the attacker's crops of the modality ``(M, 1, D, H, W)``, disjoint cases.
        target: the crop(s) whose reconstruction is measured ``(B, 1, D, H, W)`` (typically one of ``private``'s
            cases).
        prior: the uninformed prior for ``target`` (``mean_image_prior`` of auxiliary crops at its origin).
        iterations: training iterations.
        eval_every: measure every this many iterations.
        batch_size: crops per iteration (site and server alike).
        config: the job's model settings (default: the shipped job's, i.e. ``SplitModelConfig()``).
        levels: levels to hijack (default: every sent level).
        attack_options: further :class:`FeatureSpaceHijacking` arguments (width, lrs, penalty, critic steps).
        site_seed: the site's own encoder seed (``None``: from ``config.seed``).
        seed: seed of the attacker and of the batch order.
        gate: site-side check of the received gradients (see :data:`GradientGate`).
        pretrain_steps: pilot autoencoder steps on auxiliary crops before iteration 1
            (:meth:`FeatureSpaceHijacking.pretrain`).

    Returns:
        ``{"curve": [{"iteration", "applied", "ssim", "ssim_prior", "ssim_reported", "relative_leakage",
        "pilot_mse", "critic_gap"}, ...], "ssim_pilot_ceiling", "refused_at", "refusal", "levels", "settings",
        "seconds"}``; ``refused_at`` is the first iteration the gate refused (``None``: never).
    """
    from splitunet.evaluation.metrics import image_leakage

    start = time.perf_counter()
    iterations = check_positive_int("iterations", iterations)
    eval_every = check_positive_int("eval_every", eval_every)
    batch_size = check_positive_int("batch_size", batch_size)
    for name, images in (("private", private), ("auxiliary", auxiliary), ("target", target)):
        if not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[1] != 1 or not len(images):
            raise ValueError(f"{name} must be a non-empty (N, 1, D, H, W) tensor")
    config = config or SplitModelConfig()
    site = SimulatedSite(config, init_seed=site_seed)
    attack = FeatureSpaceHijacking(
        config.features, config.sent_levels, levels=levels, seed=seed, **dict(attack_options or {})
    )
    generator = torch.Generator().manual_seed(seed)
    draw_private = _batches(private.float(), batch_size, generator)
    draw_public = _batches(auxiliary.float(), batch_size, generator)
    target = target.float()
    if isinstance(pretrain_steps, bool) or not isinstance(pretrain_steps, int) or pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be an int >= 0, got {pretrain_steps!r}")
    attack.pretrain(draw_public, pretrain_steps)

    def measure(iteration: int) -> dict:
        reconstruction, _ = attack.reconstruct(site.encode(target), target.shape[2:])
        leak = image_leakage(reconstruction, target, prior)["mean"]
        row = {"iteration": iteration, "applied": site.steps_applied}
        row.update({key: leak[key] for key in ("ssim", "ssim_prior", "ssim_reported", "relative_leakage")})
        row.update({key: attack.last.get(key) for key in ("pilot_mse", "critic_gap")})
        return row

    curve = [measure(0)]
    refused_at, refusal = None, None
    for iteration in range(1, iterations + 1):
        sent = site.forward(draw_private())
        grads = attack.server_step(sent, draw_public())
        refusal = gate(iteration, grads) if gate is not None else None
        if refusal is not None:
            # A refused task ends the run (the filter's rejection becomes the task's error), so the site's encoder,
            # and with it what the server can decode, stay as they were before this iteration.
            site.discard()
            refused_at = iteration
            curve.append(measure(iteration))
            break
        site.backward(grads)
        if iteration % eval_every == 0 or iteration == iterations:
            curve.append(measure(iteration))
    ceiling = image_leakage(attack.pilot_reconstruction(target), target, prior)["mean"]["ssim"]
    return {
        "curve": curve,
        "ssim_pilot_ceiling": ceiling,
        "refused_at": refused_at,
        "refusal": refusal,
        "levels": list(attack.levels),
        "settings": {
            "iterations": iterations,
            "batch_size": batch_size,
            "crop_size": list(target.shape[2:]),
            "features": list(config.features[:NUM_LEVELS]),
            "site_lr": config.learning_rate,
            "seed": seed,
            "lr_pilot": attack.lr_pilot,
            "lr_critic": attack.lr_critic,
            "gradient_penalty": attack.gradient_penalty,
            "critic_steps": attack.critic_steps,
            "pretrain_steps": pretrain_steps,
        },
        "seconds": time.perf_counter() - start,
    }
