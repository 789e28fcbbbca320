"""The site half of a Split-U-Net step, in plain torch: no FLARE here, so it runs in one process too.

FedProx at a SplitFed site (Li et al., MLSys 2020; docs/topologies.md, "Several sites per modality"). In split
learning the site never computes its loss: the server does, and returns the gradient of that loss with respect to the
features the site sent. The site's loss is therefore only known through its gradient, and FedProx's proximal term
``(mu/2) ||w - w_anchor||^2`` (:func:`~splitunet.federated.drift_correction.proximal_term`, with ``w_anchor`` the
last average of its modality's encoders the site took) enters as its own gradient ``mu (w - w_anchor)``, added to
the encoder's parameter gradients after the server's gradient is back-propagated and before the optimiser's step.
Before the first average there is no anchor, and nothing is added. With DP-SGD the proximal gradient is added after
Opacus' clipping and noise (:meth:`~splitunet.dp.private_split.PrivateSplitTraining.step`): it depends on the
weights and the average alone, so it costs no epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
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
from splitunet.federated.drift_correction import proximal_term
from splitunet.networks import SiteEncoder, seeded_encoder
from splitunet.networks.optimizer import make_optimizer
from splitunet.site.nopeek import NoPeekPenalty, NoPeekSettings
from splitunet.wire.codec import EncodedLevel
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES

if TYPE_CHECKING:  # Opacus is the dp extra: loaded only when a job trains with DP-SGD
    from splitunet.dp.dp_settings import DPSettings
    from splitunet.dp.epsilon_budget import DPBudget
    from splitunet.dp.private_split import PrivateSplitTraining

__all__ = ["SiteTrainer", "initial_encoder", "check_fedprox_mu", "MAX_STEPS_IN_FLIGHT"]

# Forward passes whose gradients a site may await at once: two with pipeline_delay 1 (docs/design.md, "Pipelined
# steps"); a server asking for more is refused rather than followed with ever more kept batches.
MAX_STEPS_IN_FLIGHT = 2
# NoPeek's distance correlation pools positions of every case of a batch, so no per-case gradient exists to clip.
_NOPEEK_WITH_DP = (
    "NoPeek and DP-SGD cannot be combined here: the distance-correlation penalty mixes the cases of a batch, so "
    "DP-SGD's per-case gradients would not bound it"
)


def check_fedprox_mu(mu, party: str = "?") -> float:
    """FedProx's ``mu`` as a float, checked.

    Raises:
        ValueError: naming ``party``, if ``mu`` is not a finite number >= 0.
    """
    if isinstance(mu, bool) or not isinstance(mu, Real) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"{party}: fedprox_mu must be a finite number >= 0, got {mu!r}")
    return float(mu)


def initial_encoder(config: SplitModelConfig, modality: str, init_seed: int | None = None) -> SiteEncoder:
    """A site's encoder as training starts, on the CPU.

    Args:
        config: the model settings the server sent.
        modality: the site's modality; without ``init_seed`` it offsets ``config.seed``, so that the encoders of
            different sites do not start identical.
        init_seed: the site's own seed (see :meth:`SiteTrainer.build`).
    """
    return seeded_encoder(config.features, _encoder_seed(config, modality, init_seed))


def _encoder_seed(config: SplitModelConfig, modality: str, init_seed: int | None) -> int:
    """The seed of a site's initial encoder: its own, or the job's offset by modality (:func:`initial_encoder`)."""
    return config.seed + 1 + MODALITIES.index(modality) if init_seed is None else int(init_seed)


class SiteTrainer:
    """Encodes crops of one modality and applies the gradients the server returns for them.

    The server names crops by keyed case hash; only this site can map a key back to its file. Between
    :meth:`forward` and :meth:`backward` the trainer keeps the autograd graph of the features it sent; with the
    server's ``pipeline_delay`` 1 two steps are in flight, and the trainer keeps their crops instead and recomputes a
    step's forward pass when its gradients arrive (:meth:`forward`; docs/design.md, "Pipelined steps").

    Features leave and gradients arrive as host tensors (what FLARE serializes); on a GPU they cross through
    reused pinned buffers (:class:`~splitunet.compute.host_staging.PinnedStaging`), so the copies are asynchronous DMAs.

    With DP-SGD (:meth:`plan_privacy`) each backward pass computes one gradient per crop through the server's
    gradient; each case of the batch contributes one gradient, clipped, and the sum is noised
    (:class:`~splitunet.dp.private_split.PrivateSplitTraining`; what it covers: ``docs/dp.md``).

    With NoPeek (:meth:`plan_nopeek`) each backward pass adds the gradient of a distance-correlation penalty between
    the crops and the features sent (:mod:`splitunet.site.nopeek`) to the server's.

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
        fedprox_mu: FedProx's ``mu`` that came with the last average (0: no proximal term).
        fedprox_anchor: the last average's trainable weights, on the encoder's device, while ``fedprox_mu`` > 0 (the
            proximal term's ``w_anchor``); ``None`` before the first average and at ``mu`` = 0.
        private: the encoder's DP-SGD, once :meth:`plan_privacy` made it (``None``: plain training).
        nopeek: the NoPeek penalty, once :meth:`plan_nopeek` made it (``None``: none).
        dp_changes: what :func:`~splitunet.dp.prepare_for_dp` changed in the encoder (with DP-SGD).
        wire_bits: ``None``: features leave dense, in the job's ``transfer_dtype``. An int: they leave as affine
            codes of that many bits (:class:`~splitunet.wire.codec.EncodedLevel`, made on the encoder's device before
            the copy to the host), for the quantizing filter that comes first in the site's result chain to check
            and pass on; the executor sets it from that chain
            (:func:`~splitunet.filters.quantize_features.sender_encoding_bits`).
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
        self.fedprox_mu = 0.0
        self.fedprox_anchor: dict[str, torch.Tensor] | None = None
        self.private: PrivateSplitTraining | None = None
        self.nopeek: NoPeekPenalty | None = None
        self.dp_changes = None
        self.wire_bits: int | None = None
        self._pending: dict[int, torch.Tensor] | None = None
        self._pending_keys: list[str] = []
        # The crops of the pending graph's step, and (batch, keys) of every step in flight without a graph, oldest
        # first: what a pipelined step's late gradients are applied through (forward, backward).
        self._pending_batch: torch.Tensor | None = None
        self._stashed: list[tuple[torch.Tensor, list[str]]] = []

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
        self.optimizer = make_optimizer(self.encoder.parameters(), config.learning_rate, config.weight_decay)
        self.private = None
        self.nopeek = None
        # Where the NoPeek positions are drawn from: the site's own seed when it has one.
        self._seed = _encoder_seed(config, self.modality, init_seed)
        self._pending = None
        self._pending_batch, self._stashed = None, []
        self.fedprox_mu, self.fedprox_anchor = 0.0, None

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
        if self.steps_applied or self.steps_in_flight or self.private is not None:
            raise SplitUNetConfigError(f"{self.party}: DP-SGD must be planned before the encoder's first step")
        if self.nopeek is not None:
            raise SplitUNetConfigError(f"{self.party}: {_NOPEEK_WITH_DP}")
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

    def plan_nopeek(self, settings: NoPeekSettings) -> None:
        """Add NoPeek's distance-correlation penalty to every training step from now on (:mod:`splitunet.site.nopeek`).

        With frozen encoders (``train_encoders`` false) nothing trains, so the penalty is kept but never computed.

        Raises:
            SplitUNetConfigError: the encoder trains by DP-SGD, or a penalised level is not sent.
        """
        self._require_built()
        if self.private is not None:
            raise SplitUNetConfigError(f"{self.party}: {_NOPEEK_WITH_DP}")
        if settings.levels is not None and not set(settings.levels) <= set(self.config.sent_levels):
            raise SplitUNetConfigError(
                f"{self.party}: nopeek penalises levels {list(settings.levels)}, but the job sends "
                f"{list(self.config.sent_levels)} only"
            )
        # Offset from the encoder's seed: the draws are not the initialisation's.
        self.nopeek = NoPeekPenalty(settings, seed=self._seed + 7919)

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

    def _to_wire(self, features: Sequence[torch.Tensor], tag: str) -> dict[int, torch.Tensor | EncodedLevel]:
        dtype = getattr(torch, self.config.transfer_dtype)
        sent = {level: features[level].detach().to(dtype) for level in self.config.sent_levels}
        if self.wire_bits is not None:
            # Codes and scales made where the features are: only they cross to the host (a quarter of float32 at 8
            # bits). The same bits as the quantizing filter would make of the dense copy (splitunet.wire.codec).
            sent = {level: EncodedLevel.affine(tensor, self.wire_bits) for level, tensor in sent.items()}
        return self.staging.to_host(sent, tag)

    @property
    def steps_in_flight(self) -> int:
        """Training forward passes whose gradients have not come back yet (at most :data:`MAX_STEPS_IN_FLIGHT`)."""
        return len(self._stashed) + (self._pending is not None)

    def forward(self, plan: Mapping) -> dict[int, torch.Tensor]:
        """Encode the planned crops for training; returns the features to send (detached, on the host).

        Lock-step (nothing in flight) keeps the graph for :meth:`backward`. A forward while a step is still in flight
        is a pipelined step (the server's ``pipeline_delay`` 1): the optimiser's in-place step for the older step will
        change the weights this graph saved, so no graph is kept, for this step or the pending one; only their crops,
        and :meth:`backward` recomputes the forward pass when the gradients come (docs/design.md, "Pipelined steps").

        Raises:
            RuntimeError: :data:`MAX_STEPS_IN_FLIGHT` steps are in flight already.
            SplitUNetConfigError: a pipelined step with DP-SGD, which pairs every forward pass with its backward.
        """
        self._require_built()
        if self.steps_in_flight >= MAX_STEPS_IN_FLIGHT:
            raise RuntimeError(
                f"{self.party}: forward called while {self.steps_in_flight} steps' gradients are pending; at most "
                f"{MAX_STEPS_IN_FLIGHT - 1} may be (pipeline_delay 0 or 1)"
            )
        if self.private is not None:
            if self.steps_in_flight:
                # Opacus' hooks count forward passes and pair each with the next backward: a kept and a recomputed
                # pass of one step would give it a wrong per-case gradient, or none.
                raise SplitUNetConfigError(
                    f"{self.party}: DP-SGD trains lock-step only; the server sent a step before the gradients of the "
                    "last (pipeline_delay > 0): run the job with pipeline_delay 0"
                )
            # A step beyond the budget is refused before its crops are read.
            self.private.require_step()
        self.encoder.train()
        if self._pending is not None:
            self._stashed.append((self._pending_batch, self._pending_keys))
            self._pending, self._pending_batch = None, None  # frees the graph
        batch = self._batch(plan)
        if not self.config.train_encoders:
            # Frozen encoder: no gradient will come back, so no graph is kept (and none is pending).
            with torch.no_grad(), autocast(self.device, self.amp):
                return self._to_wire(self.encoder(batch), "features")
        if self._stashed:
            # Each batch is a fresh tensor (PinnedStaging reuses host buffers only), so keeping it copies nothing.
            with torch.no_grad(), autocast(self.device, self.amp):
                features = self.encoder(batch)
            self._stashed.append((batch, list(plan["keys"])))
            return self._to_wire(features, "features")
        with autocast(self.device, self.amp):
            features = self.encoder(batch)
        self._pending = {level: features[level] for level in self.config.sent_levels}
        self._pending_batch = batch
        # The case of each crop: with DP-SGD a case contributes one crop's gradient, however many it has in the batch.
        self._pending_keys = list(plan["keys"])
        return self._to_wire(features, "features")

    def backward(self, grads: Mapping[int, torch.Tensor | EncodedLevel]) -> None:
        """Back-propagate the server's gradients through the pending features and step the optimiser (with DP-SGD:
        one gradient per case, clipped, and noise; docs/dp.md). Gradients may arrive encoded
        (:class:`~splitunet.wire.codec.EncodedLevel`): they are decoded on the encoder's device.

        With FedProx (an average taken with ``fedprox_mu`` > 0) the gradient applied is that of the server's loss
        plus the proximal term ``(mu/2) ||w - w_anchor||^2``: the server's loss is known here only through the
        gradient it returned, so the proximal gradient ``mu (w - w_anchor)`` (:meth:`proximal_gradients`) is added to
        the parameters' gradients before the optimiser's step; with DP-SGD after the clipping and noise, which would
        otherwise drop it (it costs no epsilon: module docstring).

        Raises:
            BudgetExhausted: with DP-SGD, every step of the budget is taken.
        """
        self._require_built()
        if not self.config.train_encoders:
            # The job said the encoder stays frozen: a server that sends gradients anyway is not followed.
            raise ValueError(f"{self.party}: received gradients, but this job freezes the encoders (train_encoders)")
        if not self.steps_in_flight:
            raise RuntimeError(f"{self.party}: received gradients but no forward pass is pending")
        if set(grads) != set(self.config.sent_levels):
            raise ValueError(
                f"{self.party}: gradients for levels {sorted(grads)} do not match sent levels "
                f"{sorted(self.config.sent_levels)}"
            )
        if self._stashed:
            self._recompute_oldest()
        # Codes (if the gradients arrive encoded) cross to the device and are decoded there, once.
        grads = {
            level: grad.decode() if isinstance(grad, EncodedLevel) else grad
            for level, grad in self.staging.to_device(grads, "gradients").items()
        }
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
        proximal = self.proximal_gradients()
        if self.nopeek is not None:
            # The penalty's own gradient joins the server's in the same backward pass (a scalar: no grad tensor).
            outputs.append(self.nopeek(self._pending_batch, self._pending))
            grad_tensors.append(None)
        if self.private is None:
            self.optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(outputs, grad_tensors)
            for parameter, gradient in proximal.items():
                if parameter.grad is None:
                    parameter.grad = gradient.clone()
                else:
                    parameter.grad.add_(gradient)
            self.optimizer.step()
        else:
            self.private.require_step()
            self.private.zero_grad()
            self.private.backward(outputs, grad_tensors)
            self.private.step(self._pending_keys, extra_gradients=proximal)
        self._pending, self._pending_batch = None, None
        self.steps_applied += 1

    def _recompute_oldest(self) -> None:
        """The oldest pipelined step's forward pass again, with a graph, at the current weights (its gradients arrive).

        The server's gradients are those of the features the step sent, computed at the weights before the latest
        step: applying them through today's graph is the stale gradient of asynchronous pipelines (PipeDream's
        without weight stashing), one step late. Dropout is 0 and instance norm keeps no running statistics, so the
        pass is the step's own but for those weights.
        """
        batch, self._pending_keys = self._stashed.pop(0)
        self._pending_batch = batch
        self.encoder.train()
        with autocast(self.device, self.amp):
            features = self.encoder(batch)
        self._pending = {level: features[level] for level in self.config.sent_levels}

    def proximal_gradients(self) -> dict[torch.Tensor, torch.Tensor]:
        """FedProx's gradient at the current weights: parameter -> ``mu (w - w_anchor)``, the gradient of
        :func:`~splitunet.federated.drift_correction.proximal_term` between the encoder and the last average it took.

        Returns:
            an empty mapping before the first average and at ``mu`` = 0 (nothing to add).
        """
        self._require_built()
        if self.fedprox_anchor is None or self.fedprox_mu == 0.0:
            return {}
        named = [(name, p) for name, p in self.encoder.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            term = proximal_term(named, self.fedprox_anchor, self.fedprox_mu)
            # Only the term's own graph: the pending features' graph is not touched.
            gradients = torch.autograd.grad(term, [p for _, p in named], allow_unused=True)
        return {p: g.detach() for (_, p), g in zip(named, gradients) if g is not None}

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

    def load_encoder_weights(self, weights: Mapping[str, torch.Tensor], fedprox_mu: float = 0.0) -> None:
        """Take the average of the encoders sharing this site's modality; the optimiser's moments stay the site's.

        Args:
            weights: the average (the encoder's state-dict names).
            fedprox_mu: FedProx's ``mu`` (finite, >= 0): above 0 the average becomes the proximal term's anchor until
                the next average; 0 (default) trains without the term.

        Raises:
            ValueError: the job freezes the encoders, the weights have other names or shapes than the encoder, or
                ``fedprox_mu`` is not a finite number >= 0.
            RuntimeError: a step's gradients are still pending.
        """
        self._require_averageable()
        mu = check_fedprox_mu(fedprox_mu, self.party)
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
        self._set_anchor(mu, self.encoder.state_dict() if mu > 0 else None)

    def _set_anchor(self, mu: float, weights: Mapping[str, torch.Tensor] | None) -> None:
        """Keep ``mu`` and a copy of the trainable weights of ``weights`` (on the encoder's device) as the anchor."""
        self.fedprox_mu = mu
        if weights is None or mu == 0.0:
            self.fedprox_anchor = None
            return
        trainable = {name for name, p in self.encoder.named_parameters() if p.requires_grad}
        self.fedprox_anchor = {
            name: torch.as_tensor(value).detach().to(self.device).clone()
            for name, value in weights.items()
            if name in trainable
        }

    def _require_averageable(self) -> None:
        self._require_built()
        if not self.config.train_encoders:
            raise ValueError(
                f"{self.party}: this job freezes the encoders (train_encoders), so their weights are never averaged"
            )
        if self.steps_in_flight:
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
            # A resumed run goes on pulling towards the same average.
            "fedprox": None
            if self.fedprox_anchor is None
            else {
                "mu": self.fedprox_mu,
                "anchor": {name: value.detach().cpu().clone() for name, value in self.fedprox_anchor.items()},
            },
            # A resumed run draws NoPeek's next positions where the interrupted one would have.
            "nopeek_positions": None if self.nopeek is None else self.nopeek.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output (the encoder must be built with the same config; with DP-SGD, planned
        first: the checkpoint's DP-SGD steps count against this job's budget; with NoPeek, planned first too, so that
        its position draws go on from the checkpoint's).

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
        fedprox = state.get("fedprox")
        if fedprox is None:
            self._set_anchor(0.0, None)
        else:
            self._set_anchor(check_fedprox_mu(fedprox["mu"], self.party), fedprox["anchor"])
        # A checkpoint trained without NoPeek leaves a planned penalty's draws at its seed.
        if self.nopeek is not None and state.get("nopeek_positions") is not None:
            self.nopeek.generator.set_state(state["nopeek_positions"])

    def timed(self, fn, *args):
        """Run ``fn(*args)`` and return ``(result, seconds)``; synchronises CUDA so the time is real."""
        return timed_call(self.device, fn, *args)
