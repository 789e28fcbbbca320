"""The hospital's part of a U-shaped step, in plain torch: head forward, tail and loss, head backward.

No FLARE here, so the same trainer runs in one process for tests and attacks
(:mod:`splitunet.u_shape.in_process`) and behind the FLARE executor (:mod:`splitunet.u_shape.executor`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from splitunet.compute.devices import timed_call
from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.sampling import RandomCropPlanner, extract_crop
from splitunet.dp.opacus_extra import dp_module
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.networks.losses import make_loss
from splitunet.networks.optimizer import make_optimizer
from splitunet.region_scores import RegionScores
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.networks import seeded_part
from splitunet.u_shape.protocol import HOSPITAL_PARTS
from splitunet.u_shape.windows import SlidingWindows

if TYPE_CHECKING:  # Opacus is the dp extra: loaded only when a job trains with DP-SGD
    from splitunet.dp.dp_settings import DPSettings
    from splitunet.dp.epsilon_budget import DPBudget
    from splitunet.dp.private_split import PrivateSplitTraining

__all__ = ["HospitalTrainer", "split_hospital_cases"]


def split_hospital_cases(
    case_ids, num_val_cases: int, seed: int, party: str | None = None
) -> tuple[list[str], list[str]]:
    """Seeded split of a hospital's own cases into ``(train, validation)``, each sorted.

    Raises:
        SplitUNetDataError: fewer than ``num_val_cases + 1`` cases (at least one must be left to train on).
    """
    case_ids = sorted(case_ids)
    if len(case_ids) <= num_val_cases:
        raise SplitUNetDataError(
            f"{len(case_ids)} cases cannot leave {num_val_cases} for validation and at least one to train on",
            party=party,
        )
    order = [case_ids[i] for i in np.random.default_rng(seed).permutation(len(case_ids))]
    return sorted(order[num_val_cases:]), sorted(order[:num_val_cases])


class HospitalTrainer:
    """Holds a hospital's cases, labels, head, tail, loss and their optimiser.

    One training step is three calls, each answering one message from the server:

    1. :meth:`forward`: sample crops, run the head; ``x0`` goes to the server (the graph stays here).
    2. :meth:`tail_step`: ``u2`` from the server, the tail on ``(u2, x0)``, the loss and its backward; ``dL/du2``
       goes back. The tail's own share of ``dL/dx0`` (through the skip) stays here.
    3. :meth:`finish_step`: the middle's share of ``dL/dx0`` from the server is added to the skip's share, the head
       back-propagates it, and head and tail take one optimiser step together.

    With DP-SGD (:meth:`plan_privacy`) both backward passes compute one gradient per crop (the tail's from the local
    loss, the head's through the server's ``dL/dx0``), and the step clips each case's gradient over head and tail
    together (one crop per case), sums and adds noise
    (:class:`~splitunet.dp.private_split.PrivateSplitTraining`; what it covers: ``docs/dp.md``).

    Args:
        folder: the hospital's dataset.
        device: where head and tail run.
    """

    def __init__(self, folder: HospitalFolder, device: torch.device | str = "cpu"):
        self.folder = folder
        self.party = folder.party
        self.device = torch.device(device)
        self.config: UShapeConfig | None = None
        self.head: torch.nn.Module | None = None
        self.tail: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.loss_fn: torch.nn.Module | None = None
        self.planner: RandomCropPlanner | None = None
        self.train_cases: list[str] = []
        self.val_cases: list[str] = []
        self.steps_applied = 0
        self._x0: torch.Tensor | None = None  # head output of the pending step, graph attached
        self._target: torch.Tensor | None = None
        self._skip_grad: torch.Tensor | None = None  # the tail's share of dL/dx0
        self._keys: list[str] = []  # the case of each crop of the pending step
        self._validation: _Validation | None = None
        self.private: PrivateSplitTraining | None = None
        self.dp_changes = None

    # ------------------------------------------------------------------------------------------------ setup
    def build(self, config: UShapeConfig) -> None:
        """Split the cases, build head, tail and optimiser from the server's settings."""
        self.config = config
        self.train_cases, self.val_cases = split_hospital_cases(
            self.folder.case_ids, config.num_val_cases, config.seed, party=self.party
        )
        # From the label files' headers (HospitalFolder.shape): no voxel is read to plan crops.
        shapes = {case: self.folder.shape(case) for case in self.train_cases}
        # Case IDs are the planner's keys: they never leave the hospital.
        self.planner = RandomCropPlanner(shapes, config.crop_size, config.batch_size, seed=config.seed)
        self.head = seeded_part("head", config.features, config.seed).to(self.device)
        self.tail = seeded_part("tail", config.features, config.seed).to(self.device)
        self.optimizer = make_optimizer(
            [*self.head.parameters(), *self.tail.parameters()], config.learning_rate, config.weight_decay
        )
        self.loss_fn = make_loss(config.loss)
        self._clear()
        self.steps_applied = 0
        self.private = None

    def plan_privacy(self, settings: DPSettings, steps: int) -> DPBudget:
        """Train head and tail by DP-SGD from now on, within a budget of ``steps`` steps fixed here.

        The budget protects the hospital's training cases at sample rate 1 (:func:`~splitunet.dp.plan_split_budget`):
        its crop planner is seeded with the job's seed, which the server knows, so the planner's sampling amplifies
        nothing. Head and tail keep their parameter names and function
        (:func:`~splitunet.dp.prepare_for_dp` only makes activations out-of-place), so they are averaged as before.

        Args:
            settings: the job's DP-SGD settings.
            steps: the most training steps the job may take at this hospital; a step beyond them is refused.

        Raises:
            SplitUNetConfigError: a step was taken already, a part needs layer replacements, or the budget cannot be
                made (the message names why).
        """
        self._require_built()
        if self.steps_applied or self.step_pending or self.private is not None:
            raise SplitUNetConfigError(f"{self.party}: DP-SGD must be planned before the first step")
        budget_module, model_module, split_module = (
            dp_module(name, self.party) for name in ("epsilon_budget", "dp_model", "private_split")
        )
        changes = {}
        for part in HOSPITAL_PARTS:
            module, changes[part] = model_module.prepare_for_dp(getattr(self, part))
            if module is not getattr(self, part):
                # A replaced layer would change the weights the federation averages.
                raise SplitUNetConfigError(
                    f"{self.party}: the {part} needs layer replacements for DP-SGD ({changes[part].summary()})"
                )
        self.dp_changes = model_module.DPModelChanges(
            made_out_of_place=[f"{part}.{name}" for part in HOSPITAL_PARTS for name in changes[part].made_out_of_place],
            functorch=[f"{part}.{name}" for part in HOSPITAL_PARTS for name in changes[part].functorch],
        )
        budget = budget_module.plan_split_budget(settings, self.num_train_cases, steps)
        self.private = split_module.PrivateSplitTraining([self.head, self.tail], self.optimizer, budget)
        return budget

    def epsilon(self) -> float | None:
        """Epsilon spent so far by the DP-SGD of head and tail at its budget's delta (``None`` without DP-SGD)."""
        return None if self.private is None else self.private.epsilon()

    @property
    def num_train_cases(self) -> int:
        """Cases this hospital trains on: its weight in the federated average."""
        return len(self.train_cases)

    def _require_built(self) -> None:
        if self.head is None:
            raise RuntimeError(f"{self.party}: not built; the setup task must come first")

    def _clear(self) -> None:
        self._x0 = self._target = self._skip_grad = None

    # ------------------------------------------------------------------------------------------------ training
    def forward(self) -> torch.Tensor:
        """Sample the next crops and run the head; returns ``x0`` (detached, on the CPU) for the server."""
        self._require_built()
        if self._x0 is not None:
            raise RuntimeError(f"{self.party}: forward called while the previous step is not finished")
        if self.private is not None:
            # A step beyond the budget is refused before its crops are read.
            self.private.require_step()
        plan = self.planner.next_plan()
        images, targets = [], []
        for case_id, origin, flips in zip(plan["keys"], plan["origins"], plan["flips"]):
            image, regions = self.folder.read(case_id)
            images.append(extract_crop(image, origin, plan["size"], flips))
            targets.append(extract_crop(regions, origin, plan["size"], flips))
        self.head.train()
        self._x0 = self.head(torch.from_numpy(np.stack(images)).to(self.device))
        self._target = torch.from_numpy(np.stack(targets).astype(np.float32)).to(self.device)
        self._keys = list(plan["keys"])
        return self._x0.detach().cpu()

    def tail_step(self, u2: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Run the tail on the server's ``u2`` and the kept ``x0``, the loss, and its backward.

        Returns:
            ``(dL/du2 on the CPU, loss)``.
        """
        self._require_built()
        if self._x0 is None or self._skip_grad is not None:
            raise RuntimeError(f"{self.party}: received u2 but no forward pass is waiting for it")
        expected = (self._x0.shape[0], self.config.features[1], *(s // 2 for s in self._x0.shape[2:]))
        if tuple(u2.shape) != expected:
            raise ValueError(f"{self.party}: u2 has shape {tuple(u2.shape)}, expected {expected}")
        received = u2.to(self.device, torch.float32).requires_grad_(True)
        # The tail reads x0 through a leaf of its own: its gradient is the skip's share of dL/dx0, added to the
        # middle's share before the head's one backward.
        skip = self._x0.detach().requires_grad_(True)
        self.tail.train()
        loss = self.loss_fn(self.tail(received, skip), self._target)
        if self.private is None:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:
            # The loss is the mean of per-case terms: each crop's tail gradient is that of its case's own loss.
            self.private.zero_grad()
            self.private.backward([loss])
        self._skip_grad = skip.grad
        return received.grad.detach().cpu(), float(loss.detach())

    def finish_step(self, dx0: torch.Tensor) -> None:
        """Back-propagate the middle's ``dL/dx0`` plus the skip's through the head; step head and tail."""
        self._require_built()
        if self._skip_grad is None:
            raise RuntimeError(f"{self.party}: received dL/dx0 but no tail step is waiting for it")
        if tuple(dx0.shape) != tuple(self._x0.shape):
            raise ValueError(f"{self.party}: dL/dx0 has shape {tuple(dx0.shape)}, expected {tuple(self._x0.shape)}")
        total = self._skip_grad + dx0.to(self.device, self._skip_grad.dtype)
        if self.private is None:
            self._x0.backward(total)
            self.optimizer.step()
        else:
            self.private.backward([self._x0], [total])
            self.private.step(self._keys)
        self._clear()
        self.steps_applied += 1

    @property
    def step_pending(self) -> bool:
        """Whether a step waits for ``u2`` or for ``dL/dx0``."""
        return self._x0 is not None

    # ------------------------------------------------------------------------------------------------ averaging
    def parts_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Head and tail weights (CPU copies), by part: what the hospital contributes to the average."""
        self._require_built()
        if self.step_pending:
            raise RuntimeError(f"{self.party}: a step is unfinished; its weights are not the round's")
        return {part: _cpu_copy(getattr(self, part).state_dict()) for part in HOSPITAL_PARTS}

    def load_parts(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Take the federation's head and tail (strict: every weight of both parts). The optimiser's moments stay
        the hospital's own."""
        self._require_built()
        if set(states) != set(HOSPITAL_PARTS):
            raise ValueError(f"{self.party}: expected weights of {HOSPITAL_PARTS}, got {sorted(states)}")
        for part in HOSPITAL_PARTS:
            getattr(self, part).load_state_dict({k: torch.as_tensor(v) for k, v in states[part].items()})

    # ------------------------------------------------------------------------------------------------ validation
    def start_validation(self) -> None:
        """Begin sliding-window validation of the held-out cases (one case in memory at a time)."""
        self._require_built()
        self._validation = _Validation(self, list(self.val_cases))

    @torch.no_grad()
    def next_windows(self) -> torch.Tensor | None:
        """``x0`` of the next batch of validation windows (CPU), or ``None`` when every case is done."""
        if self._validation is None:
            raise RuntimeError(f"{self.party}: validation was not started")
        return self._validation.next_x0()

    @torch.no_grad()
    def take_windows(self, u2: torch.Tensor) -> None:
        """Finish the pending windows with the server's ``u2``."""
        if self._validation is None:
            raise RuntimeError(f"{self.party}: validation was not started")
        self._validation.take(u2)

    def validation_dice(self) -> dict[str, float]:
        """Dice per region over the held-out cases, and their mean (after :meth:`next_windows` returned ``None``)."""
        return self.validation_scores()[0]

    def validation_scores(self) -> tuple[dict[str, float], dict[str, float]]:
        """``(dice, hd95)`` per region over the held-out cases (:class:`~splitunet.region_scores.RegionScores`)."""
        if self._validation is None or not self._validation.done:
            raise RuntimeError(f"{self.party}: validation has not finished")
        return self._validation.scores.aggregate()

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Head, tail, optimiser and crop sampler (stays at the hospital)."""
        self._require_built()
        return {
            "party": self.party,
            "config": self.config.to_dict(),
            **{part: getattr(self, part).state_dict() for part in HOSPITAL_PARTS},
            "optimizer": self.optimizer.state_dict(),
            "planner": self.planner.state_dict(),
            "steps_applied": self.steps_applied,
            "dp": None if self.private is None else self.private.state_dict(),
        }

    def timed(self, fn, *args):
        """Run ``fn(*args)``; returns ``(result, seconds)`` (synchronising CUDA, so the time is real)."""
        return timed_call(self.device, fn, *args)


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


class _Validation:
    """Window batches of the held-out cases, one case at a time, and the scores of each finished case."""

    def __init__(self, trainer: HospitalTrainer, cases: list[str]):
        self.trainer = trainer
        self.cases = cases
        self.scores = RegionScores()
        self.windows: SlidingWindows | None = None
        self.regions: np.ndarray | None = None
        self.batch = -1
        self.x0: torch.Tensor | None = None
        self.done = False

    def next_x0(self) -> torch.Tensor | None:
        if self.x0 is not None:
            raise RuntimeError(f"{self.trainer.party}: validation windows are still waiting for u2")
        if self.windows is None or self.batch + 1 >= len(self.windows.batches):
            if not self.cases:
                self.done = True
                return None
            config = self.trainer.config
            image, self.regions = self.trainer.folder.read(self.cases.pop(0))
            self.windows = SlidingWindows(image, config.crop_size, config.sw_batch_size, config.sw_overlap)
            self.batch = -1
        self.batch += 1
        trainer = self.trainer
        trainer.head.eval()
        self.x0 = trainer.head(self.windows.window_batch(self.batch).to(trainer.device))
        return self.x0.cpu()

    def take(self, u2: torch.Tensor) -> None:
        if self.x0 is None:
            raise RuntimeError(f"{self.trainer.party}: received validation u2 but no windows are waiting")
        trainer = self.trainer
        trainer.tail.eval()
        logits = trainer.tail(u2.to(trainer.device, torch.float32), self.x0)
        self.windows.add(self.batch, logits)
        self.x0 = None
        if self.windows.complete:
            self.scores.add(self.windows.probabilities() > 0.5, self.regions)
