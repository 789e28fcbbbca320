"""UnSplit: black-box input inversion that learns a surrogate encoder and the input together."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch

from splitunet.evaluation.attacks.base import (
    Attack,
    check_levels,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from splitunet.evaluation.attacks.encoder_access import EncoderPrefix, build_encoder, input_channels
from splitunet.evaluation.attacks.objectives import feature_matching_loss, total_variation_3d
from splitunet.evaluation.attacks.observed import check_observed, resolve_crop_size
from splitunet.networks import SiteEncoder

__all__ = ["AUTHORS_BUDGET", "UnSplit", "orient_to_reference"]

# The schedule of the authors' code: ege-erdogan/unsplit, unsplit/attacks.py::model_inversion_stealing (commit
# 4d972bf, Nov 2022) and model_inversion_demo.py, which calls it with main_iters=1000, input_iters=100,
# model_iters=100; both optimisers are Adam(lr=0.001, amsgrad=True); the input loss is
# mse(features) + 0.1 * TV(x) + 1 * mean(x^2). That is 1000 x (100 + 100) = 200,000 forward/backward passes per
# attacked batch.
AUTHORS_BUDGET = {
    "outer_iterations": 1000,
    "input_steps": 100,
    "model_steps": 100,
    "lr_input": 1e-3,
    "lr_model": 1e-3,
    "tv_weight": 0.1,
    "l2_weight": 1.0,
    "amsgrad": True,
}

# Surrogates draw from seeds this far above the input-noise seeds, so that no two starts share a stream.
_SURROGATE_SEED_OFFSET = 10_000


def orient_to_reference(reconstruction: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Flip the sign of a reconstructed batch if it correlates negatively with the reference image.

    One sign for the whole batch: the batch shares one surrogate encoder, so its sign ambiguity is shared too.

    Args:
        reconstruction: ``(B, C, D, H, W)``.
        reference: ``(B, C, D, H, W)`` or ``(1, C, D, H, W)`` (e.g. the mean image of auxiliary crops).

    Returns:
        ``(oriented reconstruction, whether it was flipped)``.
    """
    if (
        reference.dim() != 5
        or reference.shape[1:] != reconstruction.shape[1:]
        or reference.shape[0] not in (1, reconstruction.shape[0])
    ):
        raise ValueError(
            f"reference must be (B or 1, C, D, H, W) like the reconstruction {tuple(reconstruction.shape)}, "
            f"got {tuple(reference.shape)}"
        )
    reference = reference.to(reconstruction).expand_as(reconstruction)
    centred_r = reconstruction.flatten(1) - reconstruction.flatten(1).mean(1, keepdim=True)
    centred_p = reference.flatten(1) - reference.flatten(1).mean(1, keepdim=True)
    flipped = bool((centred_r * centred_p).sum() < 0)
    return (-reconstruction if flipped else reconstruction), flipped


def _standardized(image: torch.Tensor) -> torch.Tensor:
    flat = image.flatten(1)
    centred = flat - flat.mean(1, keepdim=True)
    return (centred / centred.std(1, keepdim=True).clamp_min(1e-12)).reshape(image.shape)


class UnSplit(Attack):
    """Alternately optimise an input guess and a surrogate encoder so that the surrogate's features of the guess
    match the observed ones, with a total-variation prior on the guess.

    Erdogan, Kupcu and Cicek, "UnSplit: Data-Oblivious Model Inversion, Model Stealing, and Label Inference
    Attacks Against Split Learning", WPES 2022. The server knows the encoder's architecture (the job config) but
    not its weights; the surrogate starts from a fresh random initialisation. Each outer iteration takes
    ``input_steps`` Adam steps on the input (surrogate fixed), then ``model_steps`` on the surrogate (input
    fixed). The trained surrogate is kept as :attr:`surrogate` (a learned inverse can be trained on it).

    Measured on a 32^3 FLAIR crop at x0 (fresh site encoder, 60 outer iterations, mean image SSIM 0.261):

    - ``init="noise"`` (the paper's data-free start) depends much on the surrogate's random start: single starts
      reached SSIM 0.14-0.62, below the mean image for half of them. As breaching does with its trials, the
      attack runs ``restarts`` starts and keeps the one with the lowest final feature loss (a choice the attacker
      can make without ground truth): 3 starts gave 0.67 / 0.52 / 0.37 for seeds 0 / 3 / 6.
    - ``init="reference"`` starts from the standardised ``reference`` image (the mean image, which the attacker
      has anyway) plus the noise: every start beat the mean image, SSIM 0.42-0.49 for seeds 0-3 with
      ``tv_weight=0.3``, at a third of the cost of three noise starts.

    Negating the input and the surrogate's first convolution gives the same features, so the features fix the
    input only up to its sign (and, through instance normalisation, a positive affine map): pass ``reference``
    (the mean image of auxiliary crops of the modality, which the server can build for the crop it chose) to
    pick the sign that correlates positively with it; without it the sign is left as found.

    Defaults are short, for tests. For real use raise ``outer_iterations`` to 500-2000 and ``restarts`` to 5-10.
    :meth:`authors_budget` builds the authors' schedule (:data:`AUTHORS_BUDGET`: 1000 x 100 x 100 steps at
    lr 1e-3 with AMSGrad, TV 0.1, L2 1). Differences that remain: the authors' TV is squared (ours is the
    anisotropic L1 of :func:`total_variation_3d`), their feature loss an unnormalised MSE (ours is divided by the
    observation's mean square, about 0.6 at x0, so of the same order) and their input starts at a constant 0.5
    (ours from noise or the reference: the site's crops are z-scored, 0.5 has no meaning here).

    Cost of that budget on this project's 2-core CPU, one torch thread, 32^3 crop at x0 (measured with
    ``python -m splitunet.evaluation.attacks.attack_measurements unsplit``): see :func:`authors_budget`.

    Args:
        features: the job's BasicUNet feature sizes.
        levels: levels to match (default: the finest observed).
        outer_iterations: alternations between input and surrogate updates.
        input_steps: input steps per alternation.
        model_steps: surrogate steps per alternation.
        lr_input: Adam learning rate of the input.
        lr_model: Adam learning rate of the surrogate.
        tv_weight: weight of the total-variation prior.
        init_std: std of the Gaussian noise the input starts from.
        restarts: independent starts; the one with the lowest final feature loss is kept.
        init: ``"noise"`` (start from noise) or ``"reference"`` (from the standardised reference plus noise; needs
            ``reference`` in :meth:`reconstruct`).
        seed: start ``t`` draws its input noise from ``seed + t`` and its surrogate from ``seed + t + 10000``.
        device: where to optimise.
        l2_weight: weight of ``mean(x^2)`` on the input (the authors' ``l2loss``; 0: off).
        amsgrad: use AMSGrad in both Adam optimisers (the authors' choice).
        in_channels: input channels of the encoder (1: a modality site; 4: the U-shape's head); default: those of
            ``initial_state``, else 1.
        initial_state: weights every surrogate starts from instead of a random draw (a :class:`SiteEncoder`
            state dict), e.g. the weights the encoder had when the server last knew them, before the site's
            local steps moved it; its first convolution then sets the input channels.
    """

    name = "unsplit"
    threat_model = "server knows the encoder architecture, not its weights (black-box, data-free)"

    def __init__(
        self,
        features: Sequence[int],
        levels: Iterable[int] | None = None,
        outer_iterations: int = 60,
        input_steps: int = 1,
        model_steps: int = 1,
        lr_input: float = 0.1,
        lr_model: float = 0.01,
        tv_weight: float = 1.0,
        init_std: float = 0.1,
        restarts: int = 1,
        init: str = "noise",
        seed: int = 0,
        device: torch.device | str = "cpu",
        l2_weight: float = 0.0,
        amsgrad: bool = False,
        in_channels: int | None = None,
        initial_state: Mapping[str, torch.Tensor] | None = None,
    ):
        self.features = tuple(int(f) for f in features)
        self.initial_state = None if initial_state is None else dict(initial_state)
        # Validates the architecture (and the starting weights) now, not at the first call.
        self.in_channels = input_channels(build_encoder(self.features, self.initial_state, in_channels=in_channels))
        self.levels = check_levels(levels)
        self.outer_iterations = check_positive_int("outer_iterations", outer_iterations)
        self.input_steps = check_positive_int("input_steps", input_steps)
        self.model_steps = check_positive_int("model_steps", model_steps)
        self.lr_input = check_positive("lr_input", lr_input)
        self.lr_model = check_positive("lr_model", lr_model)
        self.tv_weight = check_non_negative("tv_weight", tv_weight)
        self.init_std = check_positive("init_std", init_std)
        self.restarts = check_positive_int("restarts", restarts)
        if init not in ("noise", "reference"):
            raise ValueError(f"init must be 'noise' or 'reference', got {init!r}")
        self.init = init
        self.seed = int(seed)
        self.device = torch.device(device)
        self.l2_weight = check_non_negative("l2_weight", l2_weight)
        if not isinstance(amsgrad, bool):
            raise ValueError(f"amsgrad must be a bool, got {amsgrad!r}")
        self.amsgrad = amsgrad
        self.surrogate: SiteEncoder | None = None

    @classmethod
    def authors_budget(cls, features: Sequence[int], **overrides) -> UnSplit:
        """UnSplit with the schedule of the authors' code (:data:`AUTHORS_BUDGET`); ``overrides`` change any setting.

        Measured cost (this project's 2-core CPU, one torch thread, one 32^3 crop, x0, features 8..128):
        ``python -m splitunet.evaluation.attacks.attack_measurements unsplit --outer 1`` ran one outer iteration
        (200 passes) in 71 s, 0.36 s per pass while the machine was shared, i.e. about 71,000 s (20 h) for the
        full 200,000 passes of one crop; one outer iteration at lr 1e-3 had not yet moved the input (SSIM 0.252 vs
        0.261 for the mean image), while the short budget (60 x (1 + 1), reference start, ``tv_weight=0.3``)
        reached 0.665 in 50 s in the same run. Far beyond what ``splitunet leakage`` or CI can spend per crop: use
        it as an offline,
        opt-in measurement, or scale ``outer_iterations`` down (the cost is linear in it).
        """
        return cls(features, **{**AUTHORS_BUDGET, **overrides})

    @property
    def passes(self) -> int:
        """Forward/backward passes of one reconstruction: restarts x outer x (input + model steps)."""
        return self.restarts * self.outer_iterations * (self.input_steps + self.model_steps)

    def _run(
        self, targets: dict[int, torch.Tensor], size: tuple[int, int, int], seed: int, initial: torch.Tensor | None
    ) -> tuple[torch.Tensor, SiteEncoder, float, float]:
        """One start: returns (input guess, surrogate, first and final feature loss)."""
        surrogate = build_encoder(
            self.features, self.initial_state, seed=seed + _SURROGATE_SEED_OFFSET, in_channels=self.in_channels
        ).to(self.device)
        prefix = EncoderPrefix(surrogate, targets)
        batch = next(iter(targets.values())).shape[0]
        generator = torch.Generator().manual_seed(seed)
        x = self.init_std * torch.randn((batch, self.in_channels, *size), generator=generator)
        if initial is not None:
            x = x + initial.expand_as(x)
        x = x.to(self.device).requires_grad_(True)
        input_optimizer = torch.optim.Adam([x], lr=self.lr_input, amsgrad=self.amsgrad)
        model_optimizer = torch.optim.Adam(prefix.parameters(), lr=self.lr_model, amsgrad=self.amsgrad)
        first = None
        for _ in range(self.outer_iterations):
            prefix.requires_grad_(False)
            for _ in range(self.input_steps):
                input_optimizer.zero_grad(set_to_none=True)
                match = feature_matching_loss(prefix(x), targets)
                loss = match + self.tv_weight * total_variation_3d(x)
                if self.l2_weight:
                    loss = loss + self.l2_weight * x.pow(2).mean()
                loss.backward()
                input_optimizer.step()
                first = float(match.detach()) if first is None else first
            prefix.requires_grad_(True)
            guess = x.detach()
            for _ in range(self.model_steps):
                model_optimizer.zero_grad(set_to_none=True)
                feature_matching_loss(prefix(guess), targets).backward()
                model_optimizer.step()
        surrogate.requires_grad_(False)
        with torch.no_grad():
            final = float(feature_matching_loss(prefix(x), targets))
        return x.detach().cpu(), surrogate.eval(), first, final

    def reconstruct(
        self,
        observed: Mapping[int | str, torch.Tensor],
        crop_size: Sequence[int] | None = None,
        reference: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Invert the observed features without the encoder's weights.

        Args:
            observed: level -> ``(B, features[level], ...)`` as the server received them.
            crop_size: crop size ``(D, H, W)``; inferred from the finest level when omitted.
            reference: ``(B or 1, C, D, H, W)`` image (the mean image) that sets the sign (see the class notes) and,
                with ``init="reference"``, the start.

        Returns:
            ``(reconstruction (B, C, D, H, W), stats)``; stats: levels, settings, the final feature loss of every
            start, the start kept, whether the sign was flipped, seconds.
        """
        start = time.perf_counter()
        observed = check_observed(observed)
        size = resolve_crop_size(observed, crop_size)
        levels = (min(observed),) if self.levels is None else self.levels
        missing = sorted(set(levels) - set(observed))
        if missing:
            raise ValueError(f"levels {missing} were asked for but not observed (observed: {sorted(observed)})")
        targets = {level: observed[level].to(self.device) for level in levels}
        for level, target in targets.items():
            if target.shape[1] != self.features[level]:
                raise ValueError(
                    f"level x{level} has {target.shape[1]} channels, the job's encoder makes {self.features[level]}"
                )
        batch = next(iter(targets.values())).shape[0]
        if reference is not None:
            reference = reference.detach().cpu().float()
            channels = self.in_channels
            if (
                reference.dim() != 5
                or tuple(reference.shape[1:]) != (channels, *size)
                or reference.shape[0] not in (1, batch)
            ):
                raise ValueError(
                    f"reference must be ({batch} or 1, {channels}, {', '.join(map(str, size))}), "
                    f"got {tuple(reference.shape)}"
                )
        initial = None
        if self.init == "reference":
            if reference is None:
                raise ValueError("init='reference' needs a reference image")
            initial = _standardized(reference)
        runs = [self._run(targets, size, self.seed + trial, initial) for trial in range(self.restarts)]
        finals = [run[3] for run in runs]
        best = min(range(self.restarts), key=finals.__getitem__)
        reconstruction, surrogate, first, _ = runs[best]
        flipped = False
        if reference is not None:
            reconstruction, flipped = orient_to_reference(reconstruction, reference)
            if flipped:
                # conv(-x; W, b) == conv(x; -W, b): the surrogate then maps the oriented image to the observation.
                surrogate.conv_0.conv_0.conv.weight.neg_()
        self.surrogate = surrogate
        stats = {
            "attack": self.name,
            "levels": list(levels),
            "outer_iterations": self.outer_iterations,
            "input_steps": self.input_steps,
            "model_steps": self.model_steps,
            "restarts": self.restarts,
            "lr_input": self.lr_input,
            "lr_model": self.lr_model,
            "tv_weight": self.tv_weight,
            "l2_weight": self.l2_weight,
            "amsgrad": self.amsgrad,
            "passes": self.passes,
            "feature_loss_first": first,
            "feature_loss_per_start": finals,
            "start_kept": best,
            "feature_loss_last": finals[best],
            "flipped": flipped,
            "seconds": time.perf_counter() - start,
        }
        return reconstruction, stats
