"""Validation of a training run on its held-out cases: Dice, Dice without each modality, preview segmentations.

The server holds the labels, so it scores whole held-out volumes by sliding-window inference in which the sites
encode each window (:mod:`splitunet.server.sliding_window`). How windows get encoded is the caller's: an
``encode_for(without)`` callable returns the encode function for every active site but those of ``without``'s
modality (with several sites per modality, the sites holding each case encode it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitunet.data.labels import LabelLayout, regions_to_labels
from splitunet.data.nifti_io import save_nifti_atomic
from splitunet.server.run_settings import TrainingSettings
from splitunet.server.site_roster import SiteRoster
from splitunet.server.sliding_window import EncodeFn
from splitunet.server.trainer import ServerTrainer

__all__ = ["Validation", "ValidationOutcome"]

# The encode function for every active site except those of the named site's modality (None: every active site).
EncodeFor = Callable[[str | None], EncodeFn]


def _dice_line(dice: Mapping[str, float]) -> str:
    return f"Dice TC {dice['TC']:.3f} WT {dice['WT']:.3f} ET {dice['ET']:.3f} (mean {dice['mean']:.3f})"


def _hd95_line(hd95: Mapping[str, float]) -> str:
    return f"HD95 TC {hd95['TC']:.1f} WT {hd95['WT']:.1f} ET {hd95['ET']:.1f} voxels"


def _active_modalities(roster: SiteRoster) -> dict[str, list[str]]:
    """Modality -> its active sites, in the roster's order."""
    groups: dict[str, list[str]] = {}
    for site in roster.active:
        groups.setdefault(roster.modality_of[site], []).append(site)
    return groups


@dataclass
class ValidationOutcome:
    """One validation round.

    Attributes:
        dice: Dice per region and mean, every active site encoding.
        hd95: HD95 per region and mean in voxels, same predictions (:mod:`splitunet.region_scores`).
        dice_without: modality -> Dice with that modality's site left out (final round of mean fusion only).
        predictions: case key -> written NIfTI segmentation (final round only).
    """

    dice: dict[str, float]
    hd95: dict[str, float] | None = None
    dice_without: dict[str, dict[str, float]] | None = None
    predictions: dict[str, str] | None = None


class Validation:
    """Validates the server's decoder on the held-out cases of a run.

    Args:
        trainer: the server's trainer (decoder and labels).
        keys: held-out case keys.
        shapes: key -> volume shape.
        layout: label convention of the preview files.
        settings: the run's settings: ``crop_size`` (the sliding-window size), ``sw_batch_size``, ``sw_overlap``,
            ``num_preview_cases`` (held-out cases whose final segmentation is written) and the model's fusion (with
            ``"mean"`` the final round also scores each modality's absence).
    """

    def __init__(
        self,
        trainer: ServerTrainer,
        keys: Sequence[str],
        shapes: Mapping[str, Sequence[int]],
        layout: LabelLayout,
        settings: TrainingSettings,
    ):
        self.trainer = trainer
        self.keys = list(keys)
        self.shapes = shapes
        self.layout = layout
        self.roi_size = tuple(settings.crop_size)
        self.sw_batch_size = settings.sw_batch_size
        self.sw_overlap = settings.sw_overlap
        self.num_preview_cases = settings.num_preview_cases
        self.mean_fusion = settings.model.fusion == "mean"

    def run(
        self,
        iteration: int,
        encode_for: EncodeFor,
        roster: SiteRoster,
        final: bool,
        out_dir: Path,
        log: Callable[[str], None],
    ) -> ValidationOutcome:
        """Validate at ``iteration``; the final round also scores each absent modality and writes previews.

        Args:
            iteration: the training iteration (in log lines).
            encode_for: see :data:`EncodeFor`.
            roster: the run's sites (asked which are active after the main round, which may drop some).
            final: whether this is the run's last validation.
            out_dir: the server's run folder; previews go to ``predictions/<case key>.nii.gz`` under it (FLARE
                archives the run folder, so no case ID names a file there).
            log: where progress lines go.
        """
        start = time.perf_counter()
        keep = self.keys[: self.num_preview_cases] if final else ()
        dice, hd95, kept = self._score(encode_for(None), keep)
        log(
            f"validation at iteration {iteration}: {_dice_line(dice)} on {len(self.keys)} held-out cases in "
            f"{time.perf_counter() - start:.1f}s; {_hd95_line(hd95)}"
        )
        outcome = ValidationOutcome(dice=dice, hd95=hd95)
        if final and self.mean_fusion and len(_active_modalities(roster)) > 1:
            outcome.dice_without = self._without_each(iteration, encode_for, roster, log)
        if kept:
            outcome.predictions = self.write_previews(kept, out_dir)
        return outcome

    def _score(
        self, encode: EncodeFn, keep: Sequence[str] = ()
    ) -> tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor]]:
        return self.trainer.score(
            self.keys, self.shapes, encode, self.roi_size, self.sw_batch_size, self.sw_overlap, keep=keep
        )

    def _without_each(
        self, iteration: int, encode_for: EncodeFor, roster: SiteRoster, log: Callable[[str], None]
    ) -> dict[str, dict[str, float]]:
        """Dice with each active modality left out in turn: what the model is worth when that modality is absent."""
        dice_without = {}
        for modality, sites in _active_modalities(roster).items():
            dice, _, _ = self._score(encode_for(sites[0]))
            dice_without[modality] = dice
            log(f"validation at iteration {iteration} without {modality} ({', '.join(sites)}): {_dice_line(dice)}")
        return dice_without

    def write_previews(self, kept: Mapping[str, torch.Tensor], out_dir: Path) -> dict[str, str]:
        """Write segmentations of kept probabilities as NIfTI on their labels' grid; returns case key -> file."""
        previews = {}
        for key, probabilities in kept.items():
            _, affine = self.trainer.labels.read(self.trainer.case_name(key))
            segmentation = regions_to_labels(probabilities.numpy(), self.layout)
            path = Path(out_dir) / "predictions" / f"{key}.nii.gz"
            save_nifti_atomic(segmentation.astype(np.uint8), affine, path)
            previews[key] = str(path)
        return previews
