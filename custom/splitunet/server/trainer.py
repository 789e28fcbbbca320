"""The server half of a Split-U-Net step, in plain torch: fuse, decode, loss, backward, return gradients."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitunet.compute.host_staging import PinnedStaging
from splitunet.compute.mixed_precision import amp_applies, autocast
from splitunet.data.case_keys import keys_to_case_ids
from splitunet.data.party_data import LabelFolder
from splitunet.data.sampling import extract_crop
from splitunet.networks import ServerDecoder
from splitunet.networks.losses import LOSSES, make_loss
from splitunet.networks.optimizer import make_optimizer
from splitunet.region_scores import RegionScores
from splitunet.server.sliding_window import EncodeFn, split_sliding_window
from splitunet.wire.codec import EncodedLevel
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import REGIONS

__all__ = [
    "ServerTrainer",
    "StepResult",
    "make_loss",
    "to_decoder_inputs",
    "build_decoder",
    "initial_decoder",
    "LOSSES",
]


def build_decoder(config: SplitModelConfig, num_sites: int) -> ServerDecoder:
    """The server's decoder for ``config`` and ``num_sites`` sites, on the CPU (weights from torch's generator)."""
    return ServerDecoder(
        num_sites=num_sites,
        features=config.features,
        skip_levels=config.skip_levels,
        fusion=config.fusion,
        out_channels=len(REGIONS),
    )


def initial_decoder(config: SplitModelConfig, num_sites: int) -> ServerDecoder:
    """The server's decoder as training starts (seeded by ``config.seed``), on the CPU."""
    torch.manual_seed(config.seed)
    return build_decoder(config, num_sites)


def _decoder_input(value: torch.Tensor | EncodedLevel, device: torch.device) -> torch.Tensor:
    if isinstance(value, EncodedLevel):
        # Codes and scales cross to the device (if not staged there already) and are decoded there, once.
        value = value.map_tensors(lambda t: t.to(device)).decode()
    return value.to(device, dtype=torch.float32)


def to_decoder_inputs(
    site_features: Sequence[Mapping[int, torch.Tensor | EncodedLevel] | None], device: torch.device
) -> list[dict[int, torch.Tensor] | None]:
    """Received features as the decoder takes them: float32 on its device (the wire may carry float16, or codes that
    :func:`~splitunet.wire.transport.dxo_to_features` kept encoded, which are decoded on the device)."""
    return [
        None if features is None else {level: _decoder_input(t, device) for level, t in features.items()}
        for features in site_features
    ]


@dataclass
class StepResult:
    """Outcome of one server step: the loss and, per site in order, the gradients of its features as host tensors,
    or their codes when :attr:`ServerTrainer.wire_bits` is set (``None`` for a site that sent none)."""

    loss: float
    grads: list[dict[int, torch.Tensor | EncodedLevel] | None]
    compute_s: float


class ServerTrainer:
    """Holds the labels, the decoder and the loss; turns the sites' features into their gradients.

    Features arrive and gradients leave as host tensors (what FLARE serializes); on a GPU they cross through
    reused pinned buffers (:class:`~splitunet.compute.host_staging.PinnedStaging`), one set per site. Features may
    arrive still encoded (:class:`~splitunet.wire.codec.EncodedLevel`): their codes and scales cross, and they are
    decoded on the decoder's device.

    Args:
        labels: the label holder's folder.
        case_key_secret: secret shared by the data holders for keyed case hashes.
        device: where the decoder runs.
        loss: ``"dice_ce"`` or ``"dice_focal"``.
        amp: on a CUDA device, run the decoder's training pass under bfloat16 autocast
            (:mod:`~splitunet.compute.mixed_precision`; ignored on a CPU, see :attr:`amp`); the loss is computed in
            float32, gradients leave in the job's wire precision, and validation stays float32.
        pipeline_delay: how many further steps a step's gradients may wait before their task takes them (the
            workflow's ``pipeline_delay``): the pinned host buffers they leave through are then not reused until
            that many more steps have run.

    Attributes:
        amp: whether training passes really run under autocast here.
        wire_bits: when set, each gradient level leaves as affine codes of that many bits
            (:class:`~splitunet.wire.codec.EncodedLevel`, made on the decoder's device before the copy to the host),
            for a job whose gradient chain starts with that quantizer
            (:func:`~splitunet.filters.quantize_features.sender_encoding_bits`); the filter checks them.
    """

    def __init__(
        self,
        labels: LabelFolder,
        case_key_secret: str,
        device: torch.device | str = "cpu",
        loss: str = "dice_ce",
        amp: bool = False,
        pipeline_delay: int = 0,
    ):
        self.labels = labels
        self.party = labels.party
        self.device = torch.device(device)
        self.amp = amp_applies(self.device, amp)
        self.staging = PinnedStaging(self.device)
        self.loss_fn = make_loss(loss)
        self.key_to_case = keys_to_case_ids(labels.case_ids, case_key_secret, party=self.party)
        self.config: SplitModelConfig | None = None
        self.decoder: ServerDecoder | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.num_sites = 0
        self.pipeline_delay = pipeline_delay
        self.wire_bits: int | None = None
        self._steps = 0

    def describe_cases(self) -> dict[str, dict]:
        """Keyed case list with shape and affine digest of each label volume."""
        return {key: self.labels.describe(case_id) for key, case_id in sorted(self.key_to_case.items())}

    def case_name(self, key: str) -> str:
        """The case ID behind a key, for messages at the server (which holds the labels and their IDs)."""
        return self.key_to_case.get(key, key)

    def build(self, config: SplitModelConfig, num_sites: int) -> None:
        """Create the decoder for ``num_sites`` sites and its optimiser."""
        self.config = config
        self.num_sites = num_sites
        self.decoder = initial_decoder(config, num_sites).to(self.device)
        self.optimizer = make_optimizer(self.decoder.parameters(), config.learning_rate, config.weight_decay)

    def _target(self, plan: Mapping) -> torch.Tensor:
        crops = []
        for key, origin, flips in zip(plan["keys"], plan["origins"], plan["flips"]):
            regions, _ = self.labels.read(self.key_to_case[key])
            crops.append(extract_crop(regions, origin, plan["size"], flips))
        return self.staging.to_device({0: torch.from_numpy(np.stack(crops).astype(np.float32))}, "target")[0]

    def _leaves(self, site_features: Sequence[Mapping[int, torch.Tensor]]) -> list[dict[int, torch.Tensor]]:
        if len(site_features) != self.num_sites:
            raise ValueError(f"expected features from {self.num_sites} sites, got {len(site_features)}")
        staged = [
            None if features is None else self.staging.to_device(features, f"site{index}")
            for index, features in enumerate(site_features)
        ]
        # Received features become leaves: their .grad is exactly what each site needs back. With frozen encoders
        # nothing goes back, so no gradient is computed for them.
        wanted = self.config.train_encoders
        return [
            None if features is None else {level: t.requires_grad_(wanted) for level, t in features.items()}
            for features in to_decoder_inputs(staged, self.device)
        ]

    def train_step(self, plan: Mapping, site_features: Sequence[Mapping[int, torch.Tensor] | None]) -> StepResult:
        """Decode, compute the loss against the server-held labels, update the decoder, return site gradients.

        A ``None`` entry is a site that sat this step out (mean fusion only); it gets no gradients back, and
        neither does any site when the job freezes the encoders (``train_encoders=False``).
        """
        start = time.perf_counter()
        self.decoder.train()
        leaves = self._leaves(site_features)
        with autocast(self.device, self.amp):
            logits = self.decoder(leaves)
        loss = self.loss_fn(logits.float(), self._target(plan))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        wire_dtype = getattr(torch, self.config.transfer_dtype)
        # Lock-step: one buffer set per site, as the last step's gradients have left. Pipelined: they wait for the
        # task after next, so the sets alternate.
        buffers = "" if not self.pipeline_delay else f"/{self._steps % (self.pipeline_delay + 1)}"
        self._steps += 1
        grads = [
            None
            if leaf_map is None or not self.config.train_encoders
            else self.staging.to_host(self._to_wire(leaf_map, wire_dtype), f"site{index}{buffers}")
            for index, leaf_map in enumerate(leaves)
        ]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(loss=float(loss.detach()), grads=grads, compute_s=time.perf_counter() - start)

    def _to_wire(
        self, leaf_map: Mapping[int, torch.Tensor], dtype: torch.dtype
    ) -> dict[int, torch.Tensor | EncodedLevel]:
        grads = {level: leaf.grad.detach().to(dtype) for level, leaf in leaf_map.items()}
        if self.wire_bits is None:
            return grads
        # Codes and scales made where the gradients are: only they cross to the host. The same bits as the
        # quantizing filter would make of the dense copy (splitunet.wire.codec).
        return {level: EncodedLevel.affine(grad, self.wire_bits) for level, grad in grads.items()}

    @torch.no_grad()
    def decode(self, site_features: Sequence[Mapping[int, torch.Tensor]]) -> torch.Tensor:
        """Inference: fuse and decode features to logits."""
        self.decoder.eval()
        return self.decoder(to_decoder_inputs(site_features, self.device))

    @torch.no_grad()
    def infer_volume(
        self,
        key: str,
        shape: Sequence[int],
        encode: EncodeFn,
        roi_size: Sequence[int],
        sw_batch_size: int = 4,
        overlap: float = 0.25,
    ) -> torch.Tensor:
        """Sliding-window inference of a whole volume whose image the server never sees (see
        :func:`~splitunet.server.sliding_window.split_sliding_window`).

        Returns:
            sigmoid probabilities ``(3, D, H, W)`` on the CPU.
        """
        return split_sliding_window(key, shape, encode, self.decode, roi_size, sw_batch_size, overlap)

    def validate(
        self,
        keys: Sequence[str],
        shapes: Mapping[str, Sequence[int]],
        encode: EncodeFn,
        roi_size: Sequence[int],
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        keep: Sequence[str] = (),
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Dice per region over whole held-out volumes (see :meth:`score`, which also gives HD95).

        Returns:
            ``({"TC":..., "WT":..., "ET":..., "mean":...}, {key: probabilities})`` for keys listed in ``keep``.
        """
        dice, _, kept = self.score(keys, shapes, encode, roi_size, sw_batch_size, overlap, keep)
        return dice, kept

    def score(
        self,
        keys: Sequence[str],
        shapes: Mapping[str, Sequence[int]],
        encode: EncodeFn,
        roi_size: Sequence[int],
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        keep: Sequence[str] = (),
    ) -> tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor]]:
        """Dice and HD95 per region over whole held-out volumes (:class:`~splitunet.region_scores.RegionScores`).

        Returns:
            ``(dice, hd95, {key: probabilities})``: dice and hd95 per region and ``"mean"``; probabilities for the keys
            listed in ``keep``.
        """
        scores = RegionScores()
        kept = {}
        for key in keys:
            probabilities = self.infer_volume(key, shapes[key], encode, roi_size, sw_batch_size, overlap)
            regions, _ = self.labels.read(self.key_to_case[key])
            scores.add(probabilities > 0.5, regions)
            if key in keep:
                kept[key] = probabilities
        dice, hd95 = scores.aggregate()
        return dice, hd95, kept

    def state_dict(self) -> dict:
        """Decoder and optimiser state (stays at the server)."""
        return {
            "config": self.config.to_dict(),
            "num_sites": self.num_sites,
            "decoder": self.decoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output."""
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
