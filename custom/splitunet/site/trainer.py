"""The site half of a Split-U-Net step, in plain torch: no FLARE here, so it runs in one process too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from splitunet.compute.devices import timed_call
from splitunet.compute.host_staging import PinnedStaging
from splitunet.compute.mixed_precision import amp_applies, autocast
from splitunet.data.case_keys import keys_to_case_ids
from splitunet.data.party_data import ModalityFolder
from splitunet.data.sampling import extract_crop
from splitunet.dp.opacus_extra import dp_module
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.networks import SiteEncoder, seeded_encoder
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES

if TYPE_CHECKING:  # Opacus is the dp extra: loaded only when a job trains with DP-SGD
    from splitunet.dp.dp_settings import DPSettings
    from splitunet.dp.epsilon_budget import DPBudget
    from splitunet.dp.private_split import PrivateSplitTraining

__all__ = ["SiteTrainer", "initial_encoder"]


def initial_encoder(config: SplitModelConfig, modality: str, init_seed: int | None = None) -> SiteEncoder:
    """A site's encoder as training starts, on the CPU.

    Args:
        config: the model settings the server sent.
        modality: the site's modality; without ``init_seed`` it offsets ``config.seed``, so that the encoders of
            different sites do not start identical.
        init_seed: the site's own seed (see :meth:`SiteTrainer.build`).
    """
    seed = config.seed + 1 + MODALITIES.index(modality) if init_seed is None else int(init_seed)
    return seeded_encoder(config.features, seed)


class SiteTrainer:
    """Encodes crops of one modality and applies the gradients the server returns for them.

    The server names crops by keyed case hash; only this site can map a key back to its file. Between
    :meth:`forward` and :meth:`backward` the trainer keeps the autograd graph of the features it sent.

    Features leave and gradients arrive as host tensors (what FLARE serializes); on a GPU they cross through
    reused pinned buffers (:class:`~splitunet.compute.host_staging.PinnedStaging`), so the copies are asynchronous DMAs.

    With DP-SGD (:meth:`plan_privacy`) each backward pass computes one gradient per crop through the server's
    gradient; each case of the batch contributes one gradient, clipped, and the sum is noised
    (:class:`~splitunet.dp.private_split.PrivateSplitTraining`; what it covers: ``docs/dp.md``).

    Args:
        folder: this site's modality folder.
        case_key_secret: secret shared by the data holders for keyed case hashes.
        device: where the encoder runs.
        amp: on a CUDA device, run the training forward pass under bfloat16 autocast
            (:mod:`~splitunet.compute.mixed_precision`; ignored on a CPU, see :attr:`amp`); features still leave in the
            job's wire precision, and :meth:`encode` (validation, inference) stays float32.

    Attributes:
        amp: whether training passes really run under autocast here.
        steps_applied: training steps whose gradients this encoder took.
        averages_loaded: averages of the encoders sharing this modality that this encoder took.
        private: the encoder's DP-SGD, once :meth:`plan_privacy` made it (``None``: plain training).
        dp_changes: what :func:`~splitunet.dp.prepare_for_dp` changed in the encoder (with DP-SGD).
    """

    def __init__(
        self, folder: ModalityFolder, case_key_secret: str, device: torch.device | str = "cpu", amp: bool = False
    ):
        self.folder = folder
        self.party = folder.party
        self.modality = folder.modality
        self.device = torch.device(device)
        self.amp = amp_applies(self.device, amp)
        self.staging = PinnedStaging(self.device)
        self.key_to_case = keys_to_case_ids(folder.case_ids, case_key_secret, party=self.party)
        self.config: SplitModelConfig | None = None
        self.encoder: SiteEncoder | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_applied = 0
        self.averages_loaded = 0
        self.private: PrivateSplitTraining | None = None
        self.dp_changes = None
        self._pending: dict[int, torch.Tensor] | None = None
        self._pending_keys: list[str] = []

    def describe_cases(self) -> dict[str, dict]:
        """Keyed case list with shape and affine digest: all the server learns about this site's data."""
        return {key: self.folder.describe(case_id) for key, case_id in sorted(self.key_to_case.items())}

    def build(self, config: SplitModelConfig, init_seed: int | None = None) -> None:
        """Create the encoder and its optimiser from the server's model settings.

        Args:
            config: the model settings the server sent.
            init_seed: this site's own seed for the encoder's initial weights. Without one the encoder starts
                from ``config.seed`` (offset by modality), which the server knows: it can then rebuild the
                initial encoder and invert the first activations white-box.
        """
        self.config = config
        self.encoder = initial_encoder(config, self.modality, init_seed).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.encoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.private = None
        self._pending = None

    def plan_privacy(self, settings: DPSettings, steps: int) -> DPBudget:
        """Train the encoder by DP-SGD from now on, within a budget of ``steps`` steps fixed here.

        The budget protects this site's cases (N is their number: the server may put any of them in a training
        batch) at sample rate 1 (:func:`~splitunet.dp.plan_split_budget`: the server chooses the batches); the encoder
        keeps its parameter names and function (:func:`~splitunet.dp.prepare_for_dp` only makes activations
        out-of-place).

        Args:
            settings: the job's DP-SGD settings.
            steps: the most training steps the job may take at this site; a step beyond them is refused.

        Raises:
            SplitUNetConfigError: the job freezes the encoders, AMP is on, the encoder has trained already, the
                model needs layer replacements, or the budget cannot be made (the message names why).
        """
        self._require_built()
        if not self.config.train_encoders:
            raise SplitUNetConfigError(f"{self.party}: this job freezes the encoders, so DP-SGD has nothing to train")
        if self.amp:
            raise SplitUNetConfigError(f"{self.party}: DP-SGD trains the encoder in float32 here; turn amp off")
        if self.steps_applied or self._pending is not None or self.private is not None:
            raise SplitUNetConfigError(f"{self.party}: DP-SGD must be planned before the encoder's first step")
        budget_module, model_module, split_module = (
            dp_module(name, self.party) for name in ("epsilon_budget", "dp_model", "private_split")
        )
        encoder, self.dp_changes = model_module.prepare_for_dp(self.encoder)
        if encoder is not self.encoder:
            # A replaced layer would change the weights the server averages and the checkpoints hold.
            raise SplitUNetConfigError(
                f"{self.party}: the encoder needs layer replacements for DP-SGD ({self.dp_changes.summary()})"
            )
        budget = budget_module.plan_split_budget(settings, len(self.key_to_case), steps)
        self.private = split_module.PrivateSplitTraining([self.encoder], self.optimizer, budget)
        return budget

    def epsilon(self) -> float | None:
        """Epsilon spent so far by the encoder's DP-SGD at its budget's delta (``None`` without DP-SGD)."""
        return None if self.private is None else self.private.epsilon()

    def _batch(self, plan: Mapping) -> torch.Tensor:
        crops = []
        for key, origin, flips in zip(plan["keys"], plan["origins"], plan["flips"]):
            case_id = self.key_to_case.get(key)
            if case_id is None:
                raise SplitUNetDataError(f"server asked for unknown case key {key}", party=self.party)
            volume, _ = self.folder.read(case_id)
            crops.append(extract_crop(volume, origin, plan["size"], flips))
        return self.staging.to_device({0: torch.from_numpy(np.stack(crops)[:, None])}, "crops")[0]

    def _require_built(self) -> None:
        if self.encoder is None:
            raise RuntimeError(f"{self.party}: encoder not built; the setup task must come first")

    def _to_wire(self, features: Sequence[torch.Tensor], tag: str) -> dict[int, torch.Tensor]:
        dtype = getattr(torch, self.config.transfer_dtype)
        sent = {level: features[level].detach().to(dtype) for level in self.config.sent_levels}
        return self.staging.to_host(sent, tag)

    def forward(self, plan: Mapping) -> dict[int, torch.Tensor]:
        """Encode the planned crops for training; returns the features to send (detached, on the host), keeps the
        graph."""
        self._require_built()
        if self._pending is not None:
            raise RuntimeError(f"{self.party}: forward called while the previous step's gradients are pending")
        if self.private is not None:
            # A step beyond the budget is refused before its crops are read.
            self.private.require_step()
        self.encoder.train()
        batch = self._batch(plan)
        if not self.config.train_encoders:
            # Frozen encoder: no gradient will come back, so no graph is kept (and none is pending).
            with torch.no_grad(), autocast(self.device, self.amp):
                return self._to_wire(self.encoder(batch), "features")
        with autocast(self.device, self.amp):
            features = self.encoder(batch)
        self._pending = {level: features[level] for level in self.config.sent_levels}
        # The case of each crop: with DP-SGD a case contributes one crop's gradient, however many it has in the batch.
        self._pending_keys = list(plan["keys"])
        return self._to_wire(features, "features")

    def backward(self, grads: Mapping[int, torch.Tensor]) -> None:
        """Back-propagate the server's gradients through the pending features and step the optimiser (with DP-SGD:
        one gradient per case, clipped, and noise; docs/dp.md).

        Raises:
            BudgetExhausted: with DP-SGD, every step of the budget is taken.
        """
        self._require_built()
        if not self.config.train_encoders:
            # The job said the encoder stays frozen: a server that sends gradients anyway is not followed.
            raise ValueError(f"{self.party}: received gradients, but this job freezes the encoders (train_encoders)")
        if self._pending is None:
            raise RuntimeError(f"{self.party}: received gradients but no forward pass is pending")
        if set(grads) != set(self._pending):
            raise ValueError(
                f"{self.party}: gradients for levels {sorted(grads)} do not match sent levels {sorted(self._pending)}"
            )
        grads = self.staging.to_device(grads, "gradients")
        outputs, grad_tensors = [], []
        for level, output in self._pending.items():
            # Under AMP the outputs are bfloat16; the wire's gradients take their dtype.
            grad = grads[level].to(device=output.device, dtype=output.dtype)
            if grad.shape != output.shape:
                raise ValueError(
                    f"{self.party}: gradient x{level} has shape {tuple(grad.shape)}, expected {tuple(output.shape)}"
                )
            outputs.append(output)
            grad_tensors.append(grad)
        if self.private is None:
            self.optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(outputs, grad_tensors)
            self.optimizer.step()
        else:
            self.private.require_step()
            self.private.zero_grad()
            self.private.backward(outputs, grad_tensors)
            self.private.step(self._pending_keys)
        self._pending = None
        self.steps_applied += 1

    @torch.no_grad()
    def encode(self, plan: Mapping) -> dict[int, torch.Tensor]:
        """Encode windows for validation or inference (no graph kept, float32); returns host tensors."""
        self._require_built()
        self.encoder.eval()
        features = self.encoder(self._batch(plan))
        return self._to_wire(features, "encoded")

    def encoder_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the encoder's weights: what the site sends when the sites sharing its modality average
        their encoders (docs/topologies.md, "Several sites per modality").

        Raises:
            ValueError: the job freezes the encoders (their weights are the site's private initialisation and are
                never averaged).
            RuntimeError: a step's gradients are still pending (the weights would miss that step).
        """
        self._require_averageable()
        return {name: value.detach().cpu().clone() for name, value in self.encoder.state_dict().items()}

    def load_encoder_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Take the average of the encoders sharing this site's modality; the optimiser's moments stay the site's.

        Raises:
            ValueError: the job freezes the encoders, or the weights have other names or shapes than the encoder.
            RuntimeError: a step's gradients are still pending.
        """
        self._require_averageable()
        own = self.encoder.state_dict()
        if set(weights) != set(own):
            missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
            raise ValueError(
                f"{self.party}: averaged encoder has other weights: missing {missing[:5]}, extra {extra[:5]}"
            )
        for name, value in weights.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"{self.party}: averaged weight {name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(own[name].shape)}"
                )
        # In place, so the optimiser keeps its parameters (and its moments, which stay local to this site).
        self.encoder.load_state_dict({name: torch.as_tensor(value) for name, value in weights.items()})
        self.averages_loaded += 1

    def _require_averageable(self) -> None:
        self._require_built()
        if not self.config.train_encoders:
            raise ValueError(
                f"{self.party}: this job freezes the encoders (train_encoders), so their weights are never averaged"
            )
        if self._pending is not None:
            raise RuntimeError(f"{self.party}: encoder weights asked for while a step's gradients are pending")

    def state_dict(self) -> dict:
        """Encoder and optimiser state (stays at the site)."""
        self._require_built()
        return {
            "modality": self.modality,
            "party": self.party,
            "config": self.config.to_dict(),
            "encoder": self.encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps_applied": self.steps_applied,
            "averages_loaded": self.averages_loaded,
            "dp": None if self.private is None else self.private.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output (the encoder must be built with the same config; with DP-SGD, planned
        first: the checkpoint's DP-SGD steps count against this job's budget).

        Raises:
            ValueError: the checkpoint is of another modality.
            SplitUNetConfigError: with DP-SGD, a checkpoint of an encoder trained without it, or of another schedule.
        """
        self._require_built()
        if state["modality"] != self.modality:
            raise ValueError(f"{self.party}: checkpoint is for modality {state['modality']}, not {self.modality}")
        if self.private is not None:
            if state.get("dp") is None and int(state.get("steps_applied", 0)):
                raise SplitUNetConfigError(
                    f"{self.party}: the checkpoint's encoder was trained without DP-SGD; this job's epsilon would not "
                    "cover it"
                )
            if state.get("dp") is not None:
                self.private.load_state_dict(state["dp"])
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_applied = int(state.get("steps_applied", 0))
        self.averages_loaded = int(state.get("averages_loaded", 0))

    def timed(self, fn, *args):
        """Run ``fn(*args)`` and return ``(result, seconds)``; synchronises CUDA so the time is real."""
        return timed_call(self.device, fn, *args)
