"""Split-U-Net trained in one process without FLARE: the real site and server trainers, joined by a simulated wire.

Every site's :class:`~splitunet.site.trainer.SiteTrainer` and the :class:`~splitunet.server.trainer.ServerTrainer`
are the classes the FLARE executor and controller wrap; only the transport differs. Activations and gradients
still cross :class:`~splitunet.evaluation.bench.wire.SimulatedWire` (encoding, serialization), so this is the
lower bound of a FLARE step: the same work with no messaging. With one modality it is the single-modality
baseline (one encoder, a decoder for one site).

As in the job, a wire of integer codes is quantized by each sender's trainer on its device (``wire_bits``: the job's
quantizer comes first in the sites' result chain and in the server's gradient chain) and decoded by the receiver's
trainer on its device, so on a GPU the host copies (:meth:`InProcessSplit.pcie_bytes`) are those of the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from splitunet.evaluation.bench.phantom_data import BenchData
from splitunet.evaluation.bench.timing import StepClock
from splitunet.evaluation.bench.wire import WIRE_PRECISIONS, SimulatedWire
from splitunet.server.trainer import ServerTrainer
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import DataKind

__all__ = ["InProcessSplit"]


class InProcessSplit:
    """Sites and server of a split run in one process.

    Args:
        data: the benchmark data.
        modalities: one site per modality, in decoder order.
        config: the model settings the server would send at setup.
        device: where every party computes.
        loss: the server's loss name.
        wire: how tensors cross between parties (its precision applies both ways).
        amp: every party trains under bfloat16 autocast (the job's ``amp`` option).
    """

    def __init__(
        self,
        data: BenchData,
        modalities: Sequence[str],
        config: SplitModelConfig,
        device: torch.device,
        loss: str,
        wire: SimulatedWire,
        amp: bool = False,
    ):
        if not modalities:
            raise ValueError("InProcessSplit needs at least one modality")
        self.data = data
        self.device = torch.device(device)
        self.wire = wire
        self.sites = []
        for modality in modalities:
            site = SiteTrainer(data.modality_folder(modality), data.secret, self.device, amp=amp)
            site.build(config)
            site.wire_bits = WIRE_PRECISIONS[wire.precision]
            self.sites.append(site)
        self.server = ServerTrainer(data.label_folder(), data.secret, self.device, loss, amp=amp)
        self.server.build(config, num_sites=len(self.sites))
        self.server.wire_bits = WIRE_PRECISIONS[wire.precision]
        self.last_up: list[dict[int, torch.Tensor]] = []
        self.last_down: list[dict[int, torch.Tensor]] = []

    def step(self, plan: Mapping, clock: StepClock) -> float:
        """One training iteration: forward at every site, the server's step, backward at every site.

        Parts on ``clock``: ``site_compute`` (all sites, one after the other; on a GPU with their host copies, as in
        the job), ``server_compute`` (likewise) and ``serialization``.

        Returns:
            the loss.
        """
        received = []
        self.last_up = []
        for site in self.sites:
            with clock.part("site_compute"):
                features = site.forward(plan)
            self.last_up.append(features)
            received.append(self.wire.send(features, DataKind.ACTIVATIONS, clock, keep_encoded=True))
        with clock.part("server_compute"):
            result = self.server.train_step(plan, received)
        self.last_down = result.grads
        for site, grads in zip(self.sites, result.grads):
            arrived = self.wire.send(grads, DataKind.GRADIENTS, clock, keep_encoded=True)
            with clock.part("site_compute"):
                site.backward(arrived)
        return result.loss

    def pcie_bytes(self) -> int:
        """Bytes every party copied between its device and the host so far, both ways (0 on a CPU): crops, labels,
        features (codes and scales on an integer wire) and gradients."""
        stagings = [site.staging for site in self.sites] + [self.server.staging]
        return sum(staging.bytes_to_host + staging.bytes_to_device for staging in stagings)

    def validate(self, roi_size: Sequence[int], sw_batch_size: int, overlap: float) -> dict[str, float]:
        """Dice per region on the held-out cases, by the server's sliding-window validation.

        Window features cross the wire as in the job (a quantizing filter there acts on ``split_encode`` too).
        """

        def encode(plan: dict):
            clock = StepClock(self.device)  # validation cost is not part of the step-time figures
            features = []
            for site in self.sites:
                features.append(self.wire.send(site.encode(plan), DataKind.ACTIVATIONS, clock, keep_encoded=True))
            return features

        # In float32 even with AMP: the score must not depend on the training speed-up.
        dice, _ = self.server.validate(
            self.data.val_keys, self.data.shapes, encode, roi_size, sw_batch_size=sw_batch_size, overlap=overlap
        )
        return dice
