"""The centralized baselines: one network on the 4-channel volumes, as if the modalities were pooled in one place.

Two networks: MONAI's ``BasicUNet`` with a 4-channel input (the conventional early-fusion U-Net a single
institution would train), and :class:`~splitunet.networks.MonolithicSplitUNet` (the split architecture in one
autograd graph, which the split run equals by the equivalence test; timing it separates what splitting costs from
what the architecture costs). The latter starts from the very weights the split parties start from, so with a
float32 wire the two train the same model up to float rounding, and any Dice gap is what the wire changed.
Validation goes through the FLARE server's own sliding-window scoring, so every arm of the benchmark is scored by
the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.networks.nets import BasicUNet
from torch import nn

from splitunet.compute.host_staging import PinnedStaging
from splitunet.compute.mixed_precision import amp_applies, autocast
from splitunet.data.case_keys import keys_to_case_ids
from splitunet.data.sampling import extract_crop
from splitunet.evaluation.bench.phantom_data import BenchData
from splitunet.evaluation.bench.timing import StepClock
from splitunet.networks import MonolithicSplitUNet
from splitunet.networks.layers import DEFAULT_ACT, DEFAULT_NORM
from splitunet.networks.optimizer import make_optimizer
from splitunet.server.trainer import ServerTrainer, initial_decoder, make_loss
from splitunet.site.trainer import initial_encoder
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES, REGIONS

__all__ = ["CentralizedTrainer", "NETWORKS"]

NETWORKS = ("basic_unet", "monolithic_split_unet")


class _ImageWindows(nn.Module):
    """Lets :meth:`ServerTrainer.validate` score a whole network: the one "site feature" it decodes is the image.

    ``forward([{0: x}])`` returns ``net(x)`` for ``x`` of shape ``(B, 4, D, H, W)``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, site_features: Sequence[Mapping[int, torch.Tensor]]) -> torch.Tensor:
        return self.net(site_features[0][0])


class CentralizedTrainer:
    """Trains one network on 4-channel crops with the job's loss and optimiser.

    Args:
        data: the benchmark data.
        config: features, learning rate, weight decay, seed (as the split arms get them).
        device: where the network runs.
        loss: loss name (as the server's).
        network: ``"basic_unet"`` or ``"monolithic_split_unet"``.
        amp: autocast the forward pass (the loss in float32, as the server computes it).
    """

    def __init__(
        self,
        data: BenchData,
        config: SplitModelConfig,
        device: torch.device,
        loss: str,
        network: str = "basic_unet",
        amp: bool = False,
    ):
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
        self.data = data
        self.device = torch.device(device)
        self.amp = amp_applies(self.device, amp)
        # Crops reach the GPU as the split parties' do, through pinned buffers.
        self.staging = PinnedStaging(self.device)
        self.folders = [data.modality_folder(modality) for modality in MODALITIES]
        self.labels = data.label_folder()
        self.key_to_case = keys_to_case_ids(self.labels.case_ids, data.secret, party="bench-centralized")
        torch.manual_seed(config.seed)
        if network == "basic_unet":
            self.net = BasicUNet(
                spatial_dims=3,
                in_channels=len(MODALITIES),
                out_channels=len(REGIONS),
                features=config.features,
                act=DEFAULT_ACT,
                norm=DEFAULT_NORM,
            )
        else:
            self.net = MonolithicSplitUNet.from_parts(
                [initial_encoder(config, modality) for modality in MODALITIES],
                initial_decoder(config, len(MODALITIES)),
            )
        self.net.to(self.device)
        self.optimizer = make_optimizer(self.net.parameters(), config.learning_rate, config.weight_decay)
        self.loss_fn = make_loss(loss)

    def _batch(self, plan: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = [], []
        for key, origin, flips in zip(plan["keys"], plan["origins"], plan["flips"]):
            case = self.key_to_case[key]
            channels = [extract_crop(folder.read(case)[0], origin, plan["size"], flips) for folder in self.folders]
            images.append(np.stack(channels))
            targets.append(extract_crop(self.labels.read(case)[0], origin, plan["size"], flips))
        batch = {0: torch.from_numpy(np.stack(images)), 1: torch.from_numpy(np.stack(targets).astype(np.float32))}
        staged = self.staging.to_device(batch, "batch")
        return staged[0], staged[1]

    def step(self, plan: Mapping, clock: StepClock) -> float:
        """One training iteration, timed as the ``compute`` part. Returns the loss."""
        with clock.part("compute"):
            image, target = self._batch(plan)
            self.net.train()
            with autocast(self.device, self.amp):
                logits = self.net(image)
            loss = self.loss_fn(logits.float(), target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    def validate(self, roi_size: Sequence[int], sw_batch_size: int, overlap: float) -> dict[str, float]:
        """Dice per region on the held-out cases, by the FLARE server's sliding-window validation."""
        scorer = ServerTrainer(self.labels, self.data.secret, self.device)
        scorer.decoder = _ImageWindows(self.net)

        def encode(plan: dict):
            windows = [
                np.stack(
                    [
                        extract_crop(folder.read(self.key_to_case[key])[0], origin, plan["size"])
                        for folder in self.folders
                    ]
                )
                for key, origin in zip(plan["keys"], plan["origins"])
            ]
            return [{0: torch.from_numpy(np.stack(windows)).to(self.device)}]

        # In float32 even with AMP: the score must not depend on the training speed-up.
        dice, _ = scorer.validate(
            self.data.val_keys, self.data.shapes, encode, roi_size, sw_batch_size=sw_batch_size, overlap=overlap
        )
        return dice
