"""A hospital's local training and validation for the horizontal FedAvg baseline, in plain torch and MONAI.

One round: load the global weights, take ``iterations`` Adam steps on random crops of the hospital's training
cases, return the new weights with the number of training cases (FedAvg's weight ``n_k``, McMahan et al. 2017).
With FedProx's ``mu > 0`` (Li et al., MLSys 2020) the local loss gains
:func:`~splitunet.federated.drift_correction.proximal_term`, which pulls the weights towards the round's global ones.

With DP-SGD (``settings.dp``, :mod:`splitunet.dp`) a round takes its steps through Opacus instead: Poisson batches of
whole cases (:class:`~splitunet.horizontal.case_crops.CaseCrops`, one random crop per sampled case), per-case gradient
clipping and Gaussian noise, within a budget of steps whose epsilon was projected before the first one
(:meth:`LocalTrainer.plan_privacy`).

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
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader

from splitunet.compute.devices import select_device
from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.sampling import RandomCropPlanner, extract_crop
from splitunet.dp.dp_settings import DPSettings
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.federated.drift_correction import proximal_term
from splitunet.horizontal.case_crops import CaseCrops
from splitunet.horizontal.model import FedAvgUNet, load_numpy_state, state_to_numpy
from splitunet.networks.losses import LOSSES, make_loss
from splitunet.networks.optimizer import make_optimizer
from splitunet.region_scores import RegionScores
from splitunet.server.cases import split_cases
from splitunet.wire.model_config import SplitModelConfig, check_crop_size

if TYPE_CHECKING:  # Opacus is the dp extra: loaded only when a job trains with DP-SGD
    from splitunet.dp.epsilon_budget import DPBudget
    from splitunet.dp.private_training import PrivateTraining

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
        learning_rate, weight_decay: AdamW's (decoupled decay; :mod:`splitunet.networks.optimizer`).
        num_val_cases: the hospital's held-out cases (chosen by seed; at least one case is left to train on).
        sw_batch_size: windows per forward pass at validation.
        sw_overlap: sliding-window overlap.
        seed: seed of the case split and of the crop sampling.
        dp: DP-SGD settings (the job's ``"dp"`` entry, :class:`~splitunet.dp.DPSettings`); ``None`` trains without.

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
    dp: Mapping | DPSettings | None = None
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
        self.dp = DPSettings.from_config(self.dp)


@dataclass
class LocalRound:
    """What one local round sends back.

    Attributes:
        weights: the new weights, float32 NumPy arrays by state-dict name.
        num_cases: the hospital's training cases: FedAvg's weight for these weights.
        metrics: ``loss`` (mean over the round's iterations; with DP-SGD over its non-empty batches, NaN if none),
            ``first_loss``, ``last_loss``, ``iterations``; with DP-SGD also ``dp_epsilon`` (spent so far) and
            ``dp_delta``.
    """

    weights: dict[str, np.ndarray]
    num_cases: int
    metrics: dict[str, float]

    def shared_metrics(self) -> dict[str, float]:
        """The metrics that may leave the hospital with the weights.

        Without DP-SGD all of them. With it, the losses stay home: they are computed on the training cases without
        noise, so the epsilon would not cover them; only ``iterations``, ``dp_epsilon`` and ``dp_delta`` go.
        """
        if "dp_epsilon" not in self.metrics:
            return dict(self.metrics)
        return {name: self.metrics[name] for name in ("iterations", "dp_epsilon", "dp_delta")}


class LocalTrainer:
    """Trains and validates the full U-Net on one hospital's cases.

    The Adam state and the crop sampler carry over from round to round (as a single training run's do); the
    weights come from the server at the start of every round. With DP-SGD the model goes through
    :func:`~splitunet.dp.prepare_for_dp` (its changes in :attr:`dp_changes`), and :meth:`plan_privacy` must fix the
    job's budget before the first round.

    Args:
        data: the hospital's cases.
        settings: local training settings.
        device: where the model runs (``"auto"``: CUDA if present).
        held_out: the cases to validate on, when a study fixes them (e.g. the centralized baseline of
            ``splitunet compare`` holds out exactly the hospitals' held-out cases); ``None``: ``num_val_cases`` chosen
            by seed.

    Raises:
        SplitUNetDataError: fewer than two cases (one to train on, one to validate), or ``held_out`` names a case
            the hospital lacks or leaves none to train on.
    """

    def __init__(
        self,
        data: HospitalFolder,
        settings: LocalSettings,
        device: torch.device | str = "cpu",
        held_out: Sequence[str] | None = None,
    ):
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
        if held_out is None:
            self.train_cases, self.val_cases = split_cases(cases, settings.num_val_cases, settings.seed)
        else:
            unknown = sorted(set(held_out) - set(cases))
            if unknown or len(set(held_out)) >= len(cases):
                problem = f"held-out cases {unknown} are not in the folder" if unknown else "no case is left to train"
                raise SplitUNetDataError(problem, party=self.party, file=data.folder)
            self.val_cases = sorted(set(held_out))
            self.train_cases = sorted(set(cases) - set(held_out))
        self.planner = RandomCropPlanner(
            {case: data.shape(case) for case in self.train_cases},
            settings.crop_size,
            settings.batch_size,
            settings.seed,
        )
        self.model = FedAvgUNet(settings.features, settings.skip_levels, settings.fusion, settings.seed).to(self.device)
        self.dp_changes = None
        self.budget: DPBudget | None = None
        self.private: PrivateTraining | None = None
        if settings.dp is not None:
            prepare_for_dp = _dp_module("dp_model").prepare_for_dp
            # Before the optimiser is built, so that it holds the parameters of the model Opacus trains.
            self.model, self.dp_changes = prepare_for_dp(self.model)
        self.loss_fn = make_loss(settings.loss)
        self.optimizer = make_optimizer(self.model.parameters(), settings.learning_rate, settings.weight_decay)

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

    def plan_privacy(self, total_steps: int) -> DPBudget:
        """Fix this hospital's DP-SGD budget for a job of ``total_steps`` local steps, and make the training private.

        Sigma comes from the settings or, for a ``target_epsilon``, from Opacus for exactly these steps; delta is the
        settings' or the default for this hospital's training cases; the epsilon of the whole job is projected by
        the accountant training will use. No training step may go beyond ``total_steps``.

        Raises:
            SplitUNetConfigError: the job has no DP settings, the budget cannot be made, or it was already fixed
                for another number of steps (the message names this hospital).
        """
        if self.settings.dp is None:
            raise SplitUNetConfigError(f"{self.party}: this job trains without DP-SGD; there is no budget to plan")
        if self.budget is not None:
            if self.budget.steps != total_steps:
                raise SplitUNetConfigError(
                    f"{self.party}: the DP-SGD budget was fixed for {self.budget.steps} steps; the job now asks for "
                    f"{total_steps}"
                )
            return self.budget
        budget_module, private_module = _dp_module("epsilon_budget"), _dp_module("private_training")
        try:
            budget = budget_module.plan_budget(
                self.settings.dp, self.num_train_cases, self.settings.batch_size, total_steps
            )
        except SplitUNetConfigError as error:
            raise SplitUNetConfigError(f"{self.party}: {error}") from None
        dataset = CaseCrops(self.data, self.train_cases, self.settings.crop_size, self.settings.seed)
        # Shuffled batches of B; with Poisson sampling Opacus replaces the sampler, keeping this private generator.
        loader = DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            shuffle=True,
            generator=private_module.private_generator("cpu"),
        )
        self.private = private_module.PrivateTraining(self.model, self.optimizer, loader, budget)
        self.budget = budget
        return budget

    def epsilon(self) -> float | None:
        """Epsilon spent so far by this hospital's DP-SGD at the budget's delta (``None`` without DP-SGD)."""
        return None if self.private is None else self.private.epsilon()

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
        if self.settings.dp is not None:
            return self._train_round_private(global_weights, iterations, mu)
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

    def _train_round_private(
        self, global_weights: Mapping[str, np.ndarray | torch.Tensor] | None, iterations: int, mu: float
    ) -> LocalRound:
        if self.private is None:
            raise SplitUNetConfigError(f"{self.party}: DP-SGD needs its budget planned (plan_privacy) before training")
        if mu > 0:
            # Opacus replaces the gradient by the clipped, noised per-sample sum: FedProx's term would be dropped.
            raise SplitUNetConfigError(f"{self.party}: FedProx (mu {mu}) cannot be combined with DP-SGD here")
        remaining = self.budget.steps - self.private.steps_taken
        if iterations > remaining:
            raise _dp_module("private_training").BudgetExhausted(
                f"{self.party}: the round asks for {iterations} DP-SGD steps but {remaining} of the "
                f"{self.budget.steps} the epsilon was projected for remain; refused"
            )
        if global_weights is not None:
            self.load(global_weights)
        self.model.train()
        losses = [self.private.step(self.loss_fn) for _ in range(iterations)]
        # Empty Poisson batches take a noise-only step and have no loss.
        losses = [loss for loss in losses if loss is not None] or [float("nan")]
        metrics = {
            "loss": float(np.mean(losses)),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "iterations": float(iterations),
            "dp_epsilon": self.private.epsilon(),
            "dp_delta": self.budget.delta,
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
        """Dice per region (mean over the held-out cases) of ``weights`` (default: current); see :meth:`score`.

        Returns:
            ``{"TC": ..., "WT": ..., "ET": ..., "mean": ...}``.
        """
        return self.score(weights)[0]

    def score(
        self, weights: Mapping[str, np.ndarray | torch.Tensor] | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Dice and HD95 per region over the held-out cases (:class:`~splitunet.region_scores.RegionScores`).

        Returns:
            ``(dice, hd95)``, each ``{"TC": ..., "WT": ..., "ET": ..., "mean": ...}``.
        """
        if weights is not None:
            self.load(weights)
        scores = RegionScores()
        for case in self.val_cases:
            probabilities = self.predict(case)
            _, regions = self.data.read(case)
            scores.add(probabilities > 0.5, regions)
        return scores.aggregate()


def _dp_module(name: str):
    """``splitunet.dp.<name>``, or an error naming the extra when Opacus is not installed at this hospital."""
    import importlib

    try:
        return importlib.import_module(f"splitunet.dp.{name}")
    except ImportError as error:
        raise SplitUNetConfigError(
            f"this job trains with DP-SGD, which needs Opacus ({error}): pip install 'splitunet[dp]' at this hospital"
        ) from error
