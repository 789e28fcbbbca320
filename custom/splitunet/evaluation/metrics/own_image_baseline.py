"""What a site can say about the tumour from its own image alone: the baseline label inference must beat.

A site attacking the gradients it receives already holds its modality's crop, and in FLAIR or T2 the tumour is
bright: marking bright voxels outlines it without any gradient. Leakage through the gradients is what an attack
adds on top of that, so every label-inference result is reported next to two own-image baselines and as ROC AUC:

- :func:`own_image_mask`: the same number of voxels as the attack marked, the brightest of the crop where the
  modality shows the tumour bright and the darkest where it shows it dark (:data:`TUMOUR_APPEARS_BRIGHT`, clinical
  knowledge every site has). Uses no label: this is the site's own-data baseline.
- :func:`best_threshold_dice`: the best Dice any single intensity threshold of the crop reaches (either
  polarity). It reads the truth to pick the threshold, so it is an upper bound of what one threshold of the image
  can give, not something the site could do.
- :func:`roc_auc`: MONAI's ROC AUC of a per-voxel score against the truth, threshold-free.
"""

from __future__ import annotations

import torch
from monai.metrics import compute_roc_auc

from splitunet.evaluation.metrics.label_similarity import mask_dice

__all__ = ["TUMOUR_APPEARS_BRIGHT", "own_image_mask", "best_threshold_dice", "roc_auc"]

# Whether the whole tumour (oedema and core) is brighter than brain in each modality: oedema is bright in FLAIR and
# T2; in T1gd the enhancing rim is; in T1 the core is dark and oedema slightly dark.
TUMOUR_APPEARS_BRIGHT = {"flair": True, "t1": False, "t1gd": True, "t2": True}


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 5 or image.shape[1] != 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (B, 1, D, H, W) tensor, got {shape}")


def own_image_mask(image: torch.Tensor, modality: str, marked: torch.Tensor | int) -> torch.Tensor:
    """Mark ``marked`` voxels per sample of the site's own crop: the brightest, or the darkest where the modality
    shows the tumour dark.

    Args:
        image: the site's crops ``(B, 1, D, H, W)``.
        modality: one of :data:`TUMOUR_APPEARS_BRIGHT`.
        marked: voxels to mark per sample, ``(B,)`` or one int (e.g. as many as the attack marked).

    Returns:
        ``(B, 1, D, H, W)`` in {0, 1}.
    """
    _check_image(image)
    if modality not in TUMOUR_APPEARS_BRIGHT:
        raise ValueError(f"modality must be one of {sorted(TUMOUR_APPEARS_BRIGHT)}, got {modality!r}")
    flat = image.detach().float().flatten(1)
    scores = flat if TUMOUR_APPEARS_BRIGHT[modality] else -flat
    counts = torch.as_tensor(marked).expand(flat.shape[0]).long().tolist()
    mask = torch.zeros_like(flat)
    for row, count in enumerate(counts):
        if count > 0:
            mask[row, torch.topk(scores[row], min(count, flat.shape[1])).indices] = 1.0
    return mask.reshape(image.shape)


def best_threshold_dice(image: torch.Tensor, truth: torch.Tensor, levels: int = 99) -> torch.Tensor:
    """The best Dice of ``image > t`` or ``image < t`` over ``levels`` quantile thresholds, per sample (an oracle).

    Returns:
        ``(B,)`` Dice.
    """
    _check_image(image)
    best = []
    for sample, target in zip(image.detach().float(), truth):
        cuts = torch.quantile(sample.flatten(), torch.linspace(0.01, 0.99, levels))
        masks = torch.cat([(sample > cuts.view(-1, 1, 1, 1)), (sample < cuts.view(-1, 1, 1, 1))]).float()
        dice = mask_dice(masks[:, None], target.expand(len(masks), *target.shape).float())
        best.append(dice.max())
    return torch.stack(best)


def roc_auc(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """ROC AUC of per-voxel ``scores`` ``(B, 1, D, H, W)`` against the binary ``truth``, per sample (MONAI).

    0.5 is chance; a sample whose truth is all one class gets NaN.
    """
    _check_image(scores)
    values = []
    for score, target in zip(scores.detach().float(), truth.detach().float()):
        target = target.flatten()
        if target.min() == target.max():
            values.append(torch.tensor(float("nan")))
            continue
        values.append(torch.tensor(float(compute_roc_auc(score.flatten(), target))))
    return torch.stack(values)
