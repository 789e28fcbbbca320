"""A hospital's local training and validation for the horizontal FedAvg baseline, in plain torch and MONAI.

One round: load the global weights, take ``iterations`` Adam steps on random crops of the hospital's training
cases, return the new weights with the number of training cases (FedAvg's weight ``n_k``, McMahan et al. 2017).
With FedProx's ``mu > 0`` (Li et al., MLSys 2020) the local loss gains
:func:`~splitunet.federated.drift_correction.proximal_term`, which pulls the weights towards the round's global ones.

Everything that decides what is learned is the split job's: the model
(:class:`~splitunet.horizontal.model.FedAvgUNet`), the loss (:func:`splitunet.server.trainer.make_loss`),
label-independent crops (:class:`~splitunet.data.sampling.RandomCropPlanner`,
:func:`~splitunet.data.sampling.extract_crop`), the seeded train/validation split
(:func:`splitunet.server.cases.split_cases`), and Dice per region by MONAI's ``DiceMetric`` over sliding-window
predictions with Gaussian blending in windows of the crop size. Only where the parts run differs: here one hospital
holds them all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric

from splitunet.compute.devices import select_device
from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.sampling import RandomCropPlanner, extract_crop
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.federated.drift_correction import proximal_term
from splitunet.horizontal.model import FedAvgUNet, load_numpy_state, state_to_numpy
from splitunet.server.cases import split_cases
from splitunet.server.trainer import LOSSES, make_loss
from splitunet.wire.model_config import SplitModelConfig, check_crop_size
from splitunet.wire.protocol import REGIONS

__all__ = ["LocalSettings", "LocalRound", "LocalTrainer"]


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SplitUNetConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass
class LocalSettings:
    """What a hospital's local training is set to; the FedAvg job gives the split job's values.

    Args:
        features, skip_levels, fusion: the model (:class:`~splitunet.horizontal.model.FedAvgUNet`).
        batch_size: crops per local iteration.
        crop_size: training crop ``(D, H, W)``; also the sliding-window size at validation.
        loss: ``"dice_ce"`` or ``"dice_focal"``.
        learning_rate, weight_decay: Adam's.
        num_val_cases: the hospital's held-out cases (chosen by seed; at least one case is left to train on).
        sw_batch_size: windows per forward pass at validation.
        sw_overlap: sliding-window overlap.
        seed: seed of the case split and of the crop sampling.

    Raises:
        SplitUNetConfigError: a malformed setting (the message names it).
    """

    features: Sequence[int] = SplitModelConfig.features
    skip_levels: Sequence[int] = SplitModelConfig.skip_levels
    fusion: str = SplitModelConfig.fusion
    batch_size: int = 2
    crop_size: Sequence[int] = (48, 48, 48)
    loss: str = "dice_ce"
    learning_rate: float = SplitModelConfig.learning_rate
    weight_decay: float = SplitModelConfig.weight_decay
    num_val_cases: int = 4
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    seed: int = SplitModelConfig.seed
    model: SplitModelConfig = field(init=False, repr=False)

    def __post_init__(self):
        _check_int("seed", self.seed, 0)
        self.model = SplitModelConfig(
            features=tuple(self.features),
            skip_levels=tuple(self.skip_levels),
            fusion=self.fusion,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
        )
        for name in ("batch_size", "num_val_cases", "sw_batch_size"):
            _check_int(name, getattr(self, name), 1)
        self.crop_size = check_crop_size(self.crop_size)
        if self.loss not in LOSSES:
            raise SplitUNetConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not isinstance(self.sw_overlap, (int, float)) or not 0 <= self.sw_overlap < 1:
            raise SplitUNetConfigError(f"sw_overlap must be in [0, 1), got {self.sw_overlap!r}")


@dataclass
class LocalRound:
    """What one local round sends back.

    Attributes:
        weights: the new weights, float32 NumPy arrays by state-dict name.
        num_cases: the hospital's training cases: FedAvg's weight for these weights.
        metrics: ``loss`` (mean over the round's iterations), ``first_loss``, ``last_loss``, ``iterations``.
    """

    weights: dict[str, np.ndarray]
    num_cases: int
    metrics: dict[str, float]


class LocalTrainer:
    """Trains and validates the full U-Net on one hospital's cases.

    The Adam state and the crop sampler carry over from round to round (as a single training run's do); the
    weights come from the server at the start of every round.

    Args:
        data: the hospital's cases.
        settings: local training settings.
        device: where the model runs (``"auto"``: CUDA if present).

    Raises:
        SplitUNetDataError: fewer than two cases (one to train on, one to validate).
    """

    def __init__(self, data: HospitalFolder, settings: LocalSettings, device: torch.device | str = "cpu"):
        self.data = data
        self.party = data.party
        self.settings = settings
        self.device = select_device(str(device))
        cases = data.case_ids
        if len(cases) < 2:
            raise SplitUNetDataError(
                f"the hospital has {len(cases)} case(s); need at least 2 (one to train on, one to validate)",
                party=self.party,
                file=data.folder,
            )
        self.train_cases, self.val_cases = split_cases(cases, settings.num_val_cases, settings.seed)
        self.planner = RandomCropPlanner(
            {case: data.shape(case) for case in self.train_cases},
            settings.crop_size,
            settings.batch_size,
            settings.seed,
        )
        self.model = FedAvgUNet(settings.features, settings.skip_levels, settings.fusion, settings.seed).to(self.device)
        self.loss_fn = make_loss(settings.loss)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )

    @property
    def num_train_cases(self) -> int:
        """The hospital's training cases (FedAvg's weight)."""
        return len(self.train_cases)

    def load(self, weights: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Take the global weights (refused, naming this hospital, when they fit another architecture)."""
        load_numpy_state(self.model, weights, self.party)

    def weights(self) -> dict[str, np.ndarray]:
        """The current weights as float32 NumPy arrays."""
        return state_to_numpy(self.model)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.planner.next_plan()
        images, targets = [], []
        for case, origin, flips in zip(plan["keys"], plan["origins"], plan["flips"]):
            image, regions = self.data.read(case)
            # The same origin and flips for image and labels keep them voxel-aligned.
            images.append(extract_crop(image, origin, plan["size"], flips))
            targets.append(extract_crop(regions, origin, plan["size"], flips))
        to_device = lambda arrays: torch.from_numpy(np.stack(arrays).astype(np.float32)).to(self.device)  # noqa: E731
        return to_device(images), to_device(targets)

    def train_round(
        self, global_weights: Mapping[str, np.ndarray | torch.Tensor] | None, iterations: int, mu: float = 0.0
    ) -> LocalRound:
        """``iterations`` local steps from ``global_weights`` (``None``: from the current weights).

        Args:
            global_weights: the server's model of this round.
            iterations: local Adam steps.
            mu: FedProx coefficient; the loss gains ``mu / 2 * ||w - w_global||^2``. 0 is plain FedAvg.

        Raises:
            SplitUNetConfigError: a bad ``iterations`` or ``mu``, or weights of another architecture.
        """
        _check_int("iterations", iterations, 1)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not np.isfinite(mu) or mu < 0:
            raise SplitUNetConfigError(f"{self.party}: FedProx mu must be a finite number >= 0, got {mu!r}")
        if global_weights is not None:
            self.load(global_weights)
        anchor = None
        if mu > 0:
            anchor = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        self.model.train()
        losses = []
        for _ in range(iterations):
            images, targets = self._batch()
            loss = self.loss_fn(self.model(images), targets)
            if anchor is not None:
                loss = loss + proximal_term(self.model, anchor, float(mu))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        metrics = {
            "loss": float(np.mean(losses)),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "iterations": float(iterations),
        }
        return LocalRound(weights=self.weights(), num_cases=self.num_train_cases, metrics=metrics)

    @torch.no_grad()
    def predict(self, case: str) -> torch.Tensor:
        """Sigmoid probabilities ``(3, D, H, W)`` of a whole case, on the CPU.

        The split job's sliding window: windows of the crop size, overlap ``sw_overlap``, Gaussian blending. On an
        axis where the volume is smaller than the crop, MONAI zero-pads the window, as :func:`extract_crop` pads
        the training crops (the split job clips the window to the volume instead, which the bottleneck's instance
        norm allows only from 32 voxels per axis; on volumes at least a crop wide the two are the same).
        """
        image, _ = self.data.read(case)
        self.model.eval()
        logits = sliding_window_inference(
            torch.from_numpy(np.array(image))[None].to(self.device),
            tuple(self.settings.crop_size),
            self.settings.sw_batch_size,
            self.model,
            overlap=self.settings.sw_overlap,
            mode="gaussian",
        )
        return torch.sigmoid(logits[0]).cpu()

    def validate(self, weights: Mapping[str, np.ndarray | torch.Tensor] | None = None) -> dict[str, float]:
        """Dice per region (MONAI ``DiceMetric``, mean over the held-out cases) of ``weights`` (default: current).

        Returns:
            ``{"TC": ..., "WT": ..., "ET": ..., "mean": ...}``.
        """
        if weights is not None:
            self.load(weights)
        metric = DiceMetric(include_background=True, reduction="mean_batch")
        for case in self.val_cases:
            probabilities = self.predict(case)
            _, regions = self.data.read(case)
            metric((probabilities[None] > 0.5).float(), torch.from_numpy(regions[None].astype(np.float32)))
        per_region = metric.aggregate().tolist()
        dice = {region: float(value) for region, value in zip(REGIONS, per_region)}
        dice["mean"] = float(np.nanmean(per_region))
        return dice
