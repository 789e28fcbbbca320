"""What the U-shape's server holds, recorded from an in-process run of the job's own trainers.

The run is :func:`splitunet.u_shape.in_process.train_iteration` and :func:`~splitunet.u_shape.in_process.average_round`
(the same trainer calls as :class:`~splitunet.u_shape.controller.UShapeController`), with every tensor that crosses
passed through the shipped job's wire: ``QuantizeFeatures`` int8 on both sides' task filters, encoded and decoded by
:mod:`splitunet.wire.codec` as the receiver's transport does. The recording keeps, per hospital and chosen iteration,
what the server receives (``x0``, ``dL/du2``, the loss value) and sends (``u2``), and, per round, the head and tail
it knows at the round's start: the seeded initial parts (it sent the seed) for the first round, its own average for
every later one. Nothing of a hospital's data is in it; :func:`check_server_view` says so by shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from splitunet.u_shape import in_process
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.hospital_trainer import HospitalTrainer
from splitunet.u_shape.networks import IN_CHANNELS, seeded_part
from splitunet.u_shape.protocol import HOSPITAL_PARTS
from splitunet.u_shape.server_trainer import MiddleTrainer
from splitunet.wire.codec import decode_entry, quantize_affine
from splitunet.wire.protocol import REGIONS

__all__ = ["Exchange", "ServerView", "wire_crossing", "record_server_view", "check_server_view"]

# The job's wire (jobs/u_shape_unet: QuantizeFeatures "int8" in the hospitals' result and the server's data chains).
JOB_WIRE_BITS = 8


@dataclass(frozen=True)
class Exchange:
    """One hospital's exchange with the server in one iteration, as the server holds it.

    Args:
        x0: the head's output as received ``(B, features[0], D, H, W)``.
        u2: the middle's output as the hospital received it ``(B, features[1], D/2, H/2, W/2)`` (the server can
            encode its own output the same way).
        du2: ``dL/du2`` as received, same shape as ``u2``.
        loss: the loss value the hospital reported.
    """

    x0: torch.Tensor
    u2: torch.Tensor
    du2: torch.Tensor
    loss: float


@dataclass
class ServerView:
    """Everything the server of a U-shaped run held at the recorded iterations.

    Args:
        config: the settings the server sent every hospital.
        iterations_per_round: iterations between two averagings.
        case_counts: each hospital's training cases (its averaging weight, sent at setup).
        exchanges: hospital -> iteration -> :class:`Exchange`.
        known_parts: first iteration of a round -> part (``"head"``, ``"tail"``) -> the state dict the server knows
            every hospital starts that round with.
    """

    config: UShapeConfig
    iterations_per_round: int
    case_counts: dict[str, int]
    exchanges: dict[str, dict[int, Exchange]] = field(default_factory=dict)
    known_parts: dict[int, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)

    @property
    def hospitals(self) -> list[str]:
        """The hospitals, sorted."""
        return sorted(self.case_counts)

    def round_start(self, iteration: int) -> int:
        """The first iteration of ``iteration``'s round."""
        return (int(iteration) - 1) // self.iterations_per_round * self.iterations_per_round + 1

    def known_at(self, iteration: int) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
        """The head and tail the server last knew before ``iteration`` and the local steps the hospitals have taken
        since (0 at a round's first iteration: the known parts are then exact)."""
        start = self.round_start(iteration)
        if start not in self.known_parts:
            raise KeyError(f"no known parts recorded for the round starting at iteration {start}")
        return self.known_parts[start], int(iteration) - start

    def exchange(self, hospital: str, iteration: int) -> Exchange:
        """One recorded exchange; KeyError naming what was recorded otherwise."""
        recorded = self.exchanges.get(hospital, {})
        if iteration not in recorded:
            raise KeyError(f"iteration {iteration} of {hospital} was not recorded (recorded: {sorted(recorded)})")
        return recorded[iteration]


def wire_crossing(bits: int | None = JOB_WIRE_BITS) -> in_process.Crossing:
    """The job's wire as an in-process crossing: per-channel affine codes of ``bits`` bits, decoded (``None``:
    float32, unchanged)."""

    def cross(name: str, party: str, tensor: torch.Tensor) -> torch.Tensor:
        if bits is None:
            return tensor
        return decode_entry(*quantize_affine(tensor, bits))

    return cross


class _Recorder:
    """A crossing that applies the wire and keeps what the server holds at the chosen iterations."""

    def __init__(self, wire: in_process.Crossing, keep: set[int]):
        self.wire = wire
        self.keep = keep
        self.iteration = 0
        self.tensors: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, party: str, tensor: torch.Tensor) -> torch.Tensor:
        arrived = self.wire(name, party, tensor)
        # dL/dx0 is the server's own output and reaches only the hospital: nothing to keep.
        if self.iteration in self.keep and name in ("x0", "u2", "du2"):
            self.tensors.setdefault((party, self.iteration), {})[name] = arrived.detach().clone()
        return arrived


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


def record_server_view(
    hospitals: Mapping[str, HospitalTrainer],
    server: MiddleTrainer,
    iterations_per_round: int,
    keep: Iterable[int],
    wire: in_process.Crossing | None = None,
) -> tuple[ServerView, list[dict[str, float]]]:
    """Train freshly built hospitals and middle up to the last kept iteration; record what the server holds.

    Args:
        hospitals: built :class:`HospitalTrainer` per hospital (``build`` with the config the server holds).
        server: the built middle.
        iterations_per_round: iterations between averagings (plain FedAvg of heads and tails, the job's default).
        keep: iterations (1-based) whose exchanges are kept.
        wire: the crossing every tensor goes through (default :func:`wire_crossing` at the job's int8).

    Returns:
        ``(view, losses)``: the :class:`ServerView` and every iteration's losses by hospital.
    """
    keep = {int(i) for i in keep}
    if not keep or min(keep) < 1:
        raise ValueError(f"keep must name iterations >= 1, got {sorted(keep)}")
    if iterations_per_round < 1:
        raise ValueError(f"iterations_per_round must be >= 1, got {iterations_per_round}")
    config = server.config
    view = ServerView(config, iterations_per_round, {p: h.num_train_cases for p, h in sorted(hospitals.items())})
    # The first round starts from the seeded parts: the server sent the seed, so it rebuilds them.
    view.known_parts[1] = {part: _cpu_state(seeded_part(part, config.features, config.seed)) for part in HOSPITAL_PARTS}
    recorder = _Recorder(wire or wire_crossing(), keep)
    losses = []
    for iteration in range(1, max(keep) + 1):
        recorder.iteration = iteration
        losses.append(in_process.train_iteration(hospitals, server, recorder))
        if iteration % iterations_per_round == 0 and iteration < max(keep):
            averaged = in_process.average_round(hospitals, iteration // iterations_per_round - 1)
            view.known_parts[iteration + 1] = {
                part: {name: tensor.detach().cpu().clone() for name, tensor in averaged[part].items()}
                for part in HOSPITAL_PARTS
            }
    for (party, iteration), tensors in sorted(recorder.tensors.items()):
        loss = losses[iteration - 1][party]
        view.exchanges.setdefault(party, {})[iteration] = Exchange(tensors["x0"], tensors["u2"], tensors["du2"], loss)
    return view, losses


def check_server_view(view: ServerView) -> dict:
    """Check by shape that the server's view holds no image, label or prediction; describe what it holds.

    At the crop's resolution the server may hold ``x0`` alone (``features[0]`` channels); an image has 4 channels,
    a label or a prediction as many as there are regions (3). ``u2`` and ``dL/du2`` lie at half resolution.

    Returns:
        ``{"tensors": {"x0": shape, "u2": shape, "du2": shape}, "exchanges", "known_parts", "holds_labels": False}``.

    Raises:
        ValueError: a tensor of an image's, a label's or a prediction's shape, or a known part other than the head
            and the tail (the message names the hospital and iteration).
    """
    config = view.config
    crop = tuple(config.crop_size)
    half = tuple(s // 2 for s in crop)
    private_channels = {IN_CHANNELS, len(REGIONS), 1}
    if config.features[0] in private_channels:
        raise ValueError(
            f"features[0] = {config.features[0]}: x0 would have an image's, a modality's or a label's channels"
        )
    expected = {"x0": (config.features[0], crop), "u2": (config.features[1], half), "du2": (config.features[1], half)}
    shapes, count = {}, 0
    for hospital, by_iteration in sorted(view.exchanges.items()):
        for iteration, exchange in sorted(by_iteration.items()):
            count += 1
            for name, (channels, spatial) in expected.items():
                tensor = getattr(exchange, name)
                if tensor.dim() != 5 or tensor.shape[1] != channels or tuple(tensor.shape[2:]) != spatial:
                    raise ValueError(
                        f"{hospital}, iteration {iteration}: the server holds {name} of shape {tuple(tensor.shape)}, "
                        f"expected (B, {channels}, {', '.join(map(str, spatial))}): not what crosses in the U-shape"
                    )
                shapes[name] = [int(s) for s in tensor.shape[1:]]
    for start, parts in view.known_parts.items():
        if set(parts) != set(HOSPITAL_PARTS):
            raise ValueError(f"round starting at iteration {start}: known parts {sorted(parts)}, not {HOSPITAL_PARTS}")
    return {"tensors": shapes, "exchanges": count, "known_parts": sorted(view.known_parts), "holds_labels": False}
