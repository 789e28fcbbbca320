"""One hop of the wire in one process: precision encoding, serialization, and back to tensors.

What a FLARE task does to activations (site -> server) and gradients (server -> site), minus the network: the
sender's host tensors (the trainers copy to and from their device themselves, as in the job) are encoded as the
job's transfer dtype or the ``QuantizeFeatures`` filter would (the same :mod:`splitunet.wire.codec` functions),
serialized, deserialized and decoded. The in-process split benchmark sends every tensor through this, so its step
time holds the true serialization cost and the only thing FLARE adds is its messaging.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitunet.evaluation.bench.serialization import FeatureSerializer
from splitunet.evaluation.bench.timing import StepClock
from splitunet.wire.codec import EncodedLevel, entry_bytes, quantize_affine

__all__ = ["WIRE_PRECISIONS", "encode_levels", "SimulatedWire"]

# Precision name -> affine integer bits (None: a plain float cast), as QuantizeFeatures names them.
WIRE_PRECISIONS = {"float32": None, "float16": None, "int8": 8}


def encode_levels(
    tensors: Mapping[int, torch.Tensor | EncodedLevel], precision: str
) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
    """Per-level payloads and encoding records in ``precision`` (``"float32"``, ``"float16"`` or ``"int8"``).

    A level its sender's trainer encoded already (:class:`~splitunet.wire.codec.EncodedLevel`, as a site does when
    the job's quantizer comes first in its chain) goes as it is, as that filter lets it through.

    Raises:
        ValueError: unknown precision.
    """
    if precision not in WIRE_PRECISIONS:
        raise ValueError(f"precision must be one of {list(WIRE_PRECISIONS)}, got {precision!r}")
    bits = WIRE_PRECISIONS[precision]
    payloads, encodings = {}, {}
    for level, tensor in tensors.items():
        if isinstance(tensor, EncodedLevel):
            payloads[level], encodings[level] = tensor.payload, dict(tensor.encoding)
            continue
        tensor = tensor.detach()
        if bits is None:
            payloads[level] = tensor.to(getattr(torch, precision))
        else:
            payloads[level], encodings[level] = quantize_affine(tensor, bits)
    return payloads, encodings


class SimulatedWire:
    """Sends per-level tensors across a simulated hop and reports the parts of its cost.

    Args:
        precision: wire precision of every level (``"float32"``, ``"float16"``, ``"int8"``).
        serializer: how tensors become bytes (default: FLARE's when installed).
    """

    def __init__(self, precision: str = "float32", serializer: FeatureSerializer | None = None):
        if precision not in WIRE_PRECISIONS:
            raise ValueError(f"precision must be one of {list(WIRE_PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.serializer = serializer or FeatureSerializer()
        self.payload_bytes = 0
        self.serialized_bytes = 0

    def send(
        self,
        tensors: Mapping[int, torch.Tensor | EncodedLevel],
        data_kind: str,
        clock: StepClock,
        keep_encoded: bool = False,
    ) -> dict[int, torch.Tensor | EncodedLevel]:
        """Tensors as the receiver gets them, on the host; the time goes to ``serialization``.

        Args:
            tensors: level -> host tensor (or codes), as the sender's trainer returns it.
            data_kind: the DXO kind (activations or gradients).
            clock: the step's clock.
            keep_encoded: encoded levels arrive as :class:`~splitunet.wire.codec.EncodedLevel`, for the receiver's
                trainer to decode on its device (the server, as in the job).
        """
        with clock.part("serialization"):
            payloads, encodings = encode_levels(tensors, self.precision)
            self.payload_bytes += sum(entry_bytes(payloads[level], encodings.get(level)) for level in payloads)
            blob = self.serializer.dumps(payloads, encodings, data_kind)
            self.serialized_bytes += len(blob)
            return self.serializer.loads(blob, data_kind, keep_encoded=keep_encoded)
