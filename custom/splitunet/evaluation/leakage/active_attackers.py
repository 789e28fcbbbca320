"""The two attackers of the leakage report that act over many iterations rather than on one capture.

- **Encoder tracking** (a curious server that knows a site's initial encoder): replays the site's training from
  its initial weights and the gradients the server itself sent, inverting each captured iteration with the
  tracked weights (:func:`~splitunet.evaluation.attacks.track_encoder`). It runs on the run's own captures, so it
  needs the activations and gradients of consecutive iterations (``splitunet demo --capture 1 2 3 ...``) and the
  site's initial seed (``--assume-known-init``). It shows how long white-box inversion lasts once training moves
  the weights.
- **A malicious server** (feature-space hijacking, Pasquini et al., CCS 2021) against the site with and without
  the site-side :class:`~splitunet.filters.GradientDetector`, and the detector's false alarms on honest training:
  simulated in-process on the run's data (:func:`~splitunet.evaluation.malicious_server.run_malicious_server`),
  since a shipped job never sends a hijacking gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from splitunet.evaluation.leakage.captured_run import ACTIVATIONS, GRADIENTS, CapturedRun
from splitunet.evaluation.leakage.ground_truth import AuxiliaryImages, GroundTruth
from splitunet.wire.protocol import REGIONS

__all__ = ["tracking_section", "malicious_server_section", "random_plan"]


def random_plan(truth: GroundTruth, count: int, size: Sequence[int], seed: int) -> dict:
    """A crop plan of ``count`` seeded random crops over the run's cases (the same place in every modality)."""
    rng = np.random.default_rng(seed)
    keys = sorted(truth.key_to_case)
    plan = {"keys": [], "origins": [], "flips": [], "size": [int(s) for s in size]}
    for index in range(count):
        key = keys[int(rng.integers(len(keys)))] if index >= len(keys) else keys[index]
        shape = truth.labels.read(truth.key_to_case[key])[0].shape[1:]  # (regions, D, H, W)
        plan["keys"].append(key)
        plan["origins"].append([int(rng.integers(0, max(s - c, 0) + 1)) for s, c in zip(shape, size)])
        plan["flips"].append([False, False, False])
    return plan


def tracking_section(
    run: CapturedRun, site: str, seed: int, truth: GroundTruth, aux: AuxiliaryImages, inversion_iterations: int
) -> dict | None:
    """Encoder tracking over the consecutive captured iterations of ``site``, from its initial encoder ``seed``.

    Returns:
        ``None`` without at least two consecutive iterations captured with their gradients; else ``{"rows": one per
        iteration (ssim with tracked weights, ssim_untracked with the initial ones, ssim_prior, feature_loss),
        "iterations", "notes"}``.
    """
    from splitunet.evaluation.attacks import build_encoder, track_encoder

    activations = run.iterations(ACTIVATIONS, site)
    gradients = set(run.iterations(GRADIENTS, site))
    # Iteration t's gradients travel with the request of t + 1; tracking needs an unbroken run from iteration 1.
    chain = []
    for iteration in activations:
        if iteration != len(chain) + 1 or iteration + 1 not in gradients:
            break
        chain.append(iteration)
    if len(chain) < 2:
        return None
    modality = run.sites[site]
    observed, sent, crops, priors = [], [], [], []
    for iteration in chain:
        capture = run.capture(ACTIVATIONS, site, iteration)
        observed.append(capture.observed)
        sent.append(run.capture(GRADIENTS, site, iteration + 1).observed)
        crops.append(truth.image_crops(modality, capture.plan))
        priors.append(aux.prior(capture.plan))
    features = run.model.features
    finest = min(observed[0])
    rows = track_encoder(
        features,
        build_encoder(features, seed=seed).state_dict(),
        observed,
        sent,
        learning_rate=run.model.learning_rate,
        weight_decay=run.model.weight_decay,
        inversion={"levels": [finest], "iterations": inversion_iterations, "tv_weight": 0.1 if finest == 0 else 1.0},
        truth_crops=crops,
        prior=priors,
    )
    return {
        "site": site,
        "modality": modality,
        "iterations": chain,
        "level": f"x{finest}",
        "rows": rows,
    }


def malicious_server_section(
    truth: GroundTruth,
    aux: AuxiliaryImages,
    modalities: Sequence[str],
    attacked: int,
    model_config,
    size: Sequence[int],
    iterations: int,
    honest_seeds: Sequence[int] = (0, 1, 2),
    crops: int = 16,
    seed: int = 0,
) -> dict:
    """FSHA against the site of ``modalities[attacked]`` with and without the gradient detector, simulated on the
    run's data, and the detector's false alarms on honest training of the same model.

    Args:
        truth: the run's data (the attacked site's private crops, every modality and the labels for honest runs).
        aux: the attacker's auxiliary cases of the attacked modality.
        modalities: the sites' modalities in decoder order.
        attacked: index of the attacked site in ``modalities``.
        model_config: the run's :class:`~splitunet.wire.model_config.SplitModelConfig`.
        size: crop size.
        iterations: FSHA and honest iterations.
        honest_seeds: one honest run per seed.
        crops: private crops the simulated site trains on.
        seed: seed of the crops and the attack.
    """
    from splitunet.evaluation.malicious_server import run_malicious_server

    order = [modalities[attacked]] + [m for i, m in enumerate(modalities) if i != attacked]
    plan = random_plan(truth, crops, size, seed)
    private = truth.image_crops(order[0], plan)
    honest_images = torch.cat([truth.image_crops(modality, plan) for modality in order], dim=1)
    honest_targets = torch.cat([truth.region_crops(plan, region) for region in REGIONS], dim=1)
    target_plan = random_plan(truth, 1, size, seed + 1)
    result = run_malicious_server(
        private,
        aux.random_crops(crops, size, seed=seed + 2),
        truth.image_crops(order[0], target_plan),
        aux.prior(target_plan),
        honest_images,
        honest_targets,
        iterations=iterations,
        eval_every=max(1, iterations // 8),
        honest_seeds=honest_seeds,
        config=model_config,
        seed=seed,
        progress=lambda line: print(f"  {line}", flush=True),
    )
    return {"modality": order[0], "crop_size": list(size), **_summary(result)}


def _summary(result: Mapping) -> dict:
    return {
        key: result[key]
        for key in ("curve", "detection", "bounds", "false_alarms", "settings", "seconds")
        if key in result
    }
