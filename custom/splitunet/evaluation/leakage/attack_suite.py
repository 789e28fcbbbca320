"""Run the input-inversion and label-inference attacks on one capture and score them against the truth."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from splitunet.evaluation.attacks import (
    AdaptiveWhiteBoxInversion,
    DefenseModel,
    GradientLabelInference,
    LearnedInverse,
    SubstituteEncoderAttack,
    UnSplit,
    WhiteBoxInversion,
    adaptive_label_inference,
    simulate_defense,
)
from splitunet.evaluation.attacks.white_box_inversion import INIT_CHOICES
from splitunet.evaluation.metrics import expected_random_dice, image_leakage, mask_dice
from splitunet.evaluation.metrics.own_image_baseline import (
    TUMOUR_APPEARS_BRIGHT,
    best_threshold_dice,
    own_image_mask,
    roc_auc,
)
from splitunet.networks import SiteEncoder

__all__ = [
    "INVERSION_ATTACKS",
    "ADAPTIVE_SUFFIX",
    "AttackBudget",
    "invert_capture",
    "infer_labels",
    "level_name",
]

# Input-inversion attacks in the order reports list them: strongest threat model first.
INVERSION_ATTACKS = ("white_box", "unsplit", "learned_inverse", "substitute_encoder")
# Row name of an attack's variant that models the defense the filter trail describes ("white_box_adaptive").
ADAPTIVE_SUFFIX = "_adaptive"
# Voxels of Gaussian averaging of the squared gradient norm in the adapted label attack (measured to undo gradient
# noise at multiplier 5e-3: tests/evaluation/attacks/test_label_inference_adaptive.py).
LABEL_SMOOTHING_SIGMA = 1.5


def level_name(levels: Sequence[int]) -> str:
    """``[0]`` -> ``"x0"``; ``[1, 2, 3, 4]`` -> ``"x1-x4"``."""
    levels = sorted(levels)
    return f"x{levels[0]}" if len(levels) == 1 else f"x{levels[0]}-x{levels[-1]}"


@dataclass(frozen=True)
class AttackBudget:
    """How hard each attack tries. The defaults took about 2 minutes per site on 2 CPU cores for 48^3 crops.

    Args:
        white_box_iterations: Adam steps of the white-box inversion, per level.
        unsplit_iterations: input/surrogate alternations of UnSplit, per level.
        white_box_levels: how many of the finest received levels the white-box inversions attack (``None``: all;
            the coarse levels cost the most steps and, at 48^3, were never inverted above the prior).
        unsplit_levels: how many of the finest received levels UnSplit attacks (it costs about twice the white-box
            per step, and coarse levels give it little to work with).
        learned_steps: training steps of the learned inverse (one network on all received levels).
        learned_crops: auxiliary crops it trains on.
        seed: seed of every attack's random start.
        adaptive: also run the adaptive variants (``white_box_adaptive``, ``learned_inverse_adaptive``) next to
            the plain attacks.
        adaptive_init: where the adaptive white-box inversion starts (``"prior"``: the mean auxiliary image,
            better than noise under every defense measured but int2; ``"noise"``).
        substitute_steps: training steps of the substitute-encoder attack (80 was its best length on the 32^3
            test crop: longer runs drifted to a constant image; see ``SubstituteEncoderAttack``).
        tracking_iterations: white-box inversion steps per tracked iteration (encoder tracking).
        malicious_iterations: iterations of the simulated feature-space hijacking and of each honest run the
            gradient detector is tried on (0: no malicious-server section).
        malicious_crops: private crops of the simulated site.
        honest_seeds: honest runs on which the detector's false alarms are counted.
    """

    white_box_iterations: int = 150
    white_box_levels: int | None = None
    unsplit_iterations: int = 100
    unsplit_levels: int = 2
    learned_steps: int = 300
    learned_crops: int = 24
    seed: int = 0
    adaptive: bool = True
    adaptive_init: str = "prior"
    substitute_steps: int = 80
    tracking_iterations: int = 60
    malicious_iterations: int = 40
    malicious_crops: int = 16
    honest_seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self):
        if self.adaptive_init not in INIT_CHOICES:
            raise ValueError(f"adaptive_init must be one of {INIT_CHOICES}, got {self.adaptive_init!r}")

    @classmethod
    def sweep(cls) -> AttackBudget:
        """Shorter attacks for ``splitunet sweep``, which runs them on every site of every defense's run."""
        return cls(
            white_box_iterations=100,
            white_box_levels=2,
            unsplit_iterations=60,
            unsplit_levels=1,
            learned_steps=150,
            learned_crops=16,
            malicious_iterations=0,  # the hijacking does not depend on the activation defense: once, not per row
        )

    @classmethod
    def quick(cls) -> AttackBudget:
        """A few steps of each: exercises the whole report in seconds (tests); the figures mean little."""
        return cls(
            white_box_iterations=10,
            white_box_levels=2,
            unsplit_iterations=5,
            unsplit_levels=1,
            learned_steps=10,
            learned_crops=2,
            substitute_steps=3,
            tracking_iterations=3,
            malicious_iterations=2,
            malicious_crops=2,
            honest_seeds=(0,),
        )

    def to_dict(self) -> dict:
        """The budget as plain JSON values, so that a budget read back from a report compares equal."""
        return json.loads(json.dumps(asdict(self)))


# Per-crop scores a row keeps beside the means, so that reports can pool crops across sites and give intervals.
PER_CROP_KEYS = ("ssim", "ssim_prior", "ssim_brain", "ssim_prior_brain")


def _scored(attack: str, levels: Sequence[int], reconstruction, truth, prior, stats: dict) -> dict:
    scores = image_leakage(reconstruction, truth, prior)
    row = {"attack": attack, "level": level_name(levels), **scores["mean"], "seconds": round(stats["seconds"], 2)}
    row["per_crop"] = {key: scores[key] for key in PER_CROP_KEYS}
    # How an inversion was set up, where it says (the adaptive TV weight follows the noise).
    row.update({key: stats[key] for key in ("init", "tv_weight") if key in stats})
    return row


def invert_capture(
    observed: dict[int, torch.Tensor],
    crop_size: Sequence[int],
    encoder: SiteEncoder,
    truth: torch.Tensor,
    prior: torch.Tensor,
    aux_crops: torch.Tensor,
    budget: AttackBudget,
    attacks: Sequence[str] = INVERSION_ATTACKS,
    defense: DefenseModel | None = None,
) -> tuple[list[dict], dict[tuple[str, str], torch.Tensor]]:
    """Reconstruct a site's crops from the features the server received, level by level.

    Args:
        observed: level -> received features (after every site defense).
        crop_size: the crop size.
        encoder: the encoder that produced them (white-box; the other attacks use only its architecture, or,
            for the learned inverse, its forward pass on auxiliary crops).
        truth: the crops the site encoded ``(B, 1, D, H, W)`` (scoring only).
        prior: the uninformed prior for them (mean auxiliary image at the same place).
        aux_crops: the attacker's auxiliary crops of the modality, for the learned inverse.
        budget: attack lengths.
        attacks: names from :data:`INVERSION_ATTACKS`.
        defense: the defense the capture's filter trail describes (``defense_from_trail``). With
            ``budget.adaptive``, the white-box inversion also runs adapted to it (``white_box_adaptive``, from
            ``budget.adaptive_init``), and the learned inverse also trains on features through the simulated
            defense (``learned_inverse_adaptive``; not run without a modelled defense, where it would be the same).

    Returns:
        ``(rows, reconstructions)``: one row per attack and level (SSIM, PSNR, prior, relative leakage, seconds),
        and the reconstructions keyed by ``(attack, level name)``.
    """
    unknown = sorted(set(attacks) - set(INVERSION_ATTACKS))
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; choose from {INVERSION_ATTACKS}")
    features = encoder.features
    defense = defense or DefenseModel()
    unsplit_levels = sorted(observed)[: budget.unsplit_levels]
    white_box_levels = sorted(observed)[: budget.white_box_levels]
    rows, images = [], {}
    for level in sorted(observed):
        one_level = {level: observed[level]}
        runs = []
        if "white_box" in attacks and level in white_box_levels:
            # Coarser levels need the stronger TV prior (WhiteBoxInversion's measured settings).
            settings = {
                "iterations": budget.white_box_iterations,
                "tv_weight": 0.1 if level == 0 else 1.0,
                "seed": budget.seed,
            }
            attack = WhiteBoxInversion(features, encoder.state_dict(), **settings)
            runs.append(("white_box", attack.reconstruct(one_level, crop_size)))
            if budget.adaptive:
                adaptive = AdaptiveWhiteBoxInversion(
                    features, encoder.state_dict(), defense, init=budget.adaptive_init, **settings
                )
                runs.append(("white_box" + ADAPTIVE_SUFFIX, adaptive.reconstruct(one_level, crop_size, prior=prior)))
        if "unsplit" in attacks and level in unsplit_levels:
            attack = UnSplit(
                features,
                outer_iterations=budget.unsplit_iterations,
                tv_weight=0.3 if level == 0 else 1.0,
                init="reference",
                seed=budget.seed,
            )
            runs.append(("unsplit", attack.reconstruct(one_level, crop_size, reference=prior)))
        for name, (reconstruction, stats) in runs:
            rows.append(_scored(name, [level], reconstruction, truth, prior, stats))
            images[(name, level_name([level]))] = reconstruction
    if "learned_inverse" in attacks:
        variants = [("learned_inverse", None)]
        if budget.adaptive and defense.steps:
            # The attacker's own random draws for the simulated defense, never the site's.
            generator = torch.Generator().manual_seed(budget.seed + 1)
            transform = lambda batch: simulate_defense(batch, defense, generator)  # noqa: E731
            variants.append(("learned_inverse" + ADAPTIVE_SUFFIX, transform))
        for name, transform in variants:
            started = time.perf_counter()
            attack = LearnedInverse(
                encoder, levels=sorted(observed), steps=budget.learned_steps, batch_size=2, seed=budget.seed
            )
            attack.fit(aux_crops, feature_transform=transform)
            reconstruction, stats = attack.reconstruct(observed, crop_size)
            stats["seconds"] = time.perf_counter() - started
            rows.append(_scored(name, sorted(observed), reconstruction, truth, prior, stats))
            images[(name, level_name(sorted(observed)))] = reconstruction
    if "substitute_encoder" in attacks:
        # No site weights: the server's own encoder, trained so that its features follow the received ones.
        finest = min(observed)
        started = time.perf_counter()
        attack = SubstituteEncoderAttack(features, levels=(finest,), steps=budget.substitute_steps, seed=budget.seed)
        attack.fit(aux_crops, {finest: observed[finest]})
        reconstruction, stats = attack.reconstruct({finest: observed[finest]}, crop_size)
        stats["seconds"] = time.perf_counter() - started
        rows.append(_scored("substitute_encoder", [finest], reconstruction, truth, prior, stats))
        images[("substitute_encoder", level_name([finest]))] = reconstruction
    return rows, images


def infer_labels(
    gradients: dict[int, torch.Tensor],
    crop_size: Sequence[int],
    truth: torch.Tensor,
    own_image: torch.Tensor | None = None,
    modality: str | None = None,
    defense: DefenseModel | None = None,
) -> dict:
    """A site's label inference from the gradients it received, scored against the truth and the site's own image.

    Args:
        gradients: level -> gradients the site received for one iteration's features.
        crop_size: the crop size.
        truth: the true region masks of those crops ``(B, 1, D, H, W)``.
        own_image: the site's own crops of its modality ``(B, 1, D, H, W)``: what it could infer without any
            gradient (:mod:`splitunet.evaluation.metrics.own_image_baseline`). Without it only the random-mask
            chance level is given.
        modality: the site's modality (which way its image shows the tumour); needed with ``own_image``.
        defense: the defense the gradients' filter trail describes; its gradient noise sets the adaptive attack's
            smoothing (:func:`~splitunet.evaluation.attacks.adaptive_label_inference`).

    Returns:
        level used, mean Dice of the inferred mask, mean Dice a random mask of the same size would get, fraction
        of voxels marked, the gradient score's ROC AUC, the Dice of the attack that smooths the squared gradient
        norm first (``dice_smoothed``, the adaptation to gradient noise); with ``own_image``: the Dice of the same
        number of the image's most tumour-like voxels as each attack marks (``dice_own_image`` for the plain
        attack, ``dice_own_image_smoothed``, ``dice_own_image_adaptive``), the best single threshold of the image
        (an oracle, ``dice_own_image_best_threshold``), the image's AUC, and ``gain_over_own_image``: the largest
        of the three attacks' gains over the own image at their own voxel counts (``gain_variant`` names it). The
        adaptive attack (smoothing from the trail's gradient noise, Otsu and quantile thresholds): ``dice_adaptive``
        of the mask its attacker-side rule chose (``adaptive_chosen``), ``dice_adaptive_candidates`` per threshold,
        and ``dice_adaptive_oracle``, the best of them by Dice against the truth (an upper bound the attacker cannot
        pick), and with ``own_image`` ``gain_over_own_image_adaptive``: dice_adaptive minus
        dice_own_image_adaptive.
    """
    started = time.perf_counter()
    attack = GradientLabelInference(method="norm", threshold="otsu")
    mask, stats = attack.reconstruct(gradients, crop_size)
    score, _ = attack.score_map(gradients, crop_size)
    marked = mask.flatten(1).sum(1)
    # The attack adapted to gradient noise: the squared norm averaged before thresholding.
    smoothed, _ = GradientLabelInference(method="norm", smoothing_sigma=LABEL_SMOOTHING_SIGMA).reconstruct(
        gradients, crop_size
    )
    dice = float(mask_dice(mask, truth).mean())
    dice_smoothed = float(mask_dice(smoothed, truth).mean())
    noise = (defense or DefenseModel()).noise(stats["level"])
    candidates, adaptive = adaptive_label_inference(
        gradients, crop_size, noise_std=noise[1] if noise else 0.0, level=stats["level"]
    )
    dice_candidates = {name: float(mask_dice(m, truth).mean()) for name, m in candidates.items() if name != "chosen"}
    dice_adaptive = float(mask_dice(candidates["chosen"], truth).mean())
    result = {
        "attack": "label_inference",
        "level": level_name([stats["level"]]),
        "dice": dice,
        "dice_smoothed": dice_smoothed,
        "dice_adaptive": dice_adaptive,
        "adaptive_chosen": adaptive["chosen"],
        "adaptive_smoothing_sigma": adaptive["smoothing_sigma"],
        "dice_adaptive_candidates": dice_candidates,
        "dice_adaptive_oracle": max(dice_candidates.values()),
        "dice_random_mask": float(expected_random_dice(truth, marked).mean()),
        "fraction_marked": float(mask.mean()),
        "auc": float(roc_auc(score, truth).nanmean()),
    }
    if own_image is not None:
        if modality is None:
            raise ValueError("infer_labels needs the site's modality to score its own image")

        def own_dice(attack_mask: torch.Tensor) -> float:
            # The baseline marks as many voxels as the attack it is compared with: a mask of another size would
            # score differently from the image alone (under gradient noise Otsu marks ~45 %, q0.95 marks 5 %).
            count = attack_mask.flatten(1).sum(1)
            return float(mask_dice(own_image_mask(own_image, modality, count), truth).mean())

        own = {"plain": own_dice(mask), "smoothed": own_dice(smoothed), "adaptive": own_dice(candidates["chosen"])}
        attack_dice = {"plain": dice, "smoothed": dice_smoothed, "adaptive": dice_adaptive}
        gains = {variant: attack_dice[variant] - own[variant] for variant in own}
        best = max(gains, key=gains.get)
        brightness = own_image if TUMOUR_APPEARS_BRIGHT[modality] else -own_image
        result.update(
            dice_own_image=own["plain"],
            dice_own_image_smoothed=own["smoothed"],
            dice_own_image_adaptive=own["adaptive"],
            dice_own_image_best_threshold=float(best_threshold_dice(own_image, truth).mean()),
            auc_own_image=float(roc_auc(brightness, truth).nanmean()),
            gain_variant=best,
            gain_over_own_image=gains[best],
            gain_over_own_image_adaptive=gains["adaptive"],
        )
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result
