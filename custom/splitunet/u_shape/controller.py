"""FLARE server workflow of the U-shaped split: adapts :class:`~splitunet.u_shape.server_trainer.MiddleTrainer` and
the round's averaging to FLARE tasks.

One iteration is two round trips with every hospital at once (tasks of :mod:`splitunet.u_shape.protocol`):

1. ``u_forward``: down ``dL/dx0`` of the last step (or, at a round's start, the federation's head and tail); the
   hospital finishes that step and answers with ``x0`` of the next crops.
2. ``u_tail``: down ``u2`` (the middle's output); the hospital runs tail and loss and answers with ``dL/du2``.

The middle then steps, and its ``dL/dx0`` rides on the next ``u_forward``. A round ends with ``u_collect``: down the
last ``dL/dx0``, up the hospitals' heads and tails, which are averaged by case count (and corrected by DWCS if the
job says so); the average rides on the next round's first ``u_forward`` or on the first ``u_validate``. So a round of
R iterations costs ``2 R + 1`` round trips, validation one more per window batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from nvflare.apis.dxo import DXO
from nvflare.apis.dxo import DataKind as FlareDataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from splitunet.checkpoint import save_checkpoint
from splitunet.compute.devices import select_device
from splitunet.flare.site_tasks import SiteTaskController
from splitunet.flare.workspace_paths import checkpoint_folder
from splitunet.u_shape.averaging import average_parts, make_correction
from splitunet.u_shape.protocol import U2_LEVEL, X0_LEVEL, UMetaKey, UTaskName
from splitunet.u_shape.run_record import UShapeRecord
from splitunet.u_shape.server_trainer import MiddleTrainer
from splitunet.u_shape.settings import UShapeSettings
from splitunet.u_shape.weights_transport import dxo_to_parts, parts_to_dxo, weights_bytes
from splitunet.wire.protocol import DataKind, MetaKey
from splitunet.wire.transport import control_dxo, dxo_to_features, features_to_dxo, payload_bytes

__all__ = ["UShapeController", "MIDDLE_CHECKPOINT"]

# The middle as the run left it, in the server's run folder (models/).
MIDDLE_CHECKPOINT = "u_shape_middle_last.pt"


def _bytes(dxo: DXO) -> int:
    return weights_bytes(dxo) if dxo.data_kind == FlareDataKind.WEIGHTS else payload_bytes(dxo)


class UShapeController(SiteTaskController):
    """Server workflow of the U-shaped split (Yang et al., RoS-FL): one shared middle, heads and tails averaged.

    The server sees ``x0`` and ``dL/du2`` of every hospital, the loss values, the heads' and tails' weights at each
    round's end and the validation Dice; never an image, a label, a prediction or a case name. Its arguments are
    the fields of :class:`~splitunet.u_shape.settings.UShapeSettings`, which documents and checks them.
    """

    record_class = UShapeRecord

    def __init__(
        self,
        num_rounds: int = 10,
        iterations_per_round: int = 20,
        batch_size: int = 2,
        crop_size: Sequence[int] = (48, 48, 48),
        features: Sequence[int] = (8, 16, 32, 64, 128, 8),
        loss: str = "dice_ce",
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-5,
        seed: int = 0,
        num_val_cases: int = 1,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        val_every: int = 5,
        drift_correction: Mapping | None = None,
        sites: Sequence[str] | None = None,
        experiment: str = "u_shape_unet",
        device: str = "auto",
        log_every: int = 10,
        task_timeout: int = 600,
        task_check_period: float = 0.005,
        task_long_poll_s: float = 0.0,
        num_threads: int = 0,
    ):
        # The arguments are the settings' fields, by name; taken before any other local exists.
        self._use_settings(UShapeSettings(**{name: value for name, value in locals().items() if name != "self"}))
        self.trainer: MiddleTrainer | None = None

    def _run(self, abort_signal: Signal, fl_ctx: FLContext, out_dir: Path) -> None:
        s, record = self.settings, self.record
        self.sites = self._sites_to_use(fl_ctx)
        self.trainer = MiddleTrainer(select_device(s.device))
        self.trainer.build(s.model)
        correction = make_correction(s.drift_correction)
        counts = self._setup(abort_signal, fl_ctx)
        record.hospitals = counts
        record.model = s.model.to_dict()
        record.drift_correction = correction.describe() if correction is not None else None
        self.log_info(
            fl_ctx,
            f"U-shaped training: {s.num_rounds} rounds of {s.iterations_per_round} iterations; hospitals and their "
            f"training cases {counts}; middle on {self.trainer.device}; "
            f"{'DWCS' if correction is not None else 'plain FedAvg'} of heads and tails",
        )
        down = {site: control_dxo({MetaKey.ITERATION: 1}) for site in self.sites}
        iteration = 0
        for round_index in range(s.num_rounds):
            for _ in range(s.iterations_per_round):
                if abort_signal.triggered:
                    return
                iteration += 1
                down = self._iteration(down, iteration, fl_ctx, abort_signal)
            averaged = self._average(down, round_index, correction, fl_ctx, abort_signal)
            record.rounds = round_index + 1
            last = round_index == s.num_rounds - 1
            meta = {UMetaKey.ROUND: round_index + 1, MetaKey.ITERATION: iteration + 1, UMetaKey.FINAL: last}
            down = {site: parts_to_dxo(averaged, meta) for site in self.sites}
            if last or (round_index + 1) % s.val_every == 0:
                self._validate(down, round_index + 1, iteration, fl_ctx, abort_signal)
                down = {site: control_dxo({MetaKey.ITERATION: iteration + 1}) for site in self.sites}
        path = save_checkpoint(
            self.trainer.state_dict(), checkpoint_folder(fl_ctx, None, s.experiment) / MIDDLE_CHECKPOINT
        )
        self.log_info(fl_ctx, f"saved the middle to {path}")

    # ------------------------------------------------------------------------------------------------ steps
    def _exchange(
        self, task: str, down: Mapping[str, DXO], iteration: int, fl_ctx: FLContext, abort_signal: Signal
    ) -> dict[str, DXO]:
        """One round trip of ``task`` with the hospitals in ``down``; counts it and notes the filters."""
        sent = sum(_bytes(dxo) for dxo in down.values())
        data = {site: dxo.to_shareable() for site, dxo in down.items()}
        replies = self._round_trip(task, data, iteration, fl_ctx, abort_signal)
        for site, reply in replies.items():
            self.record.note_filters(site, reply.get_meta_prop(MetaKey.FILTER_TRAIL))
        self.record.add_exchange(task, sent, sum(_bytes(reply) for reply in replies.values()))
        return replies

    def _setup(self, abort_signal: Signal, fl_ctx: FLContext) -> dict[str, int]:
        meta = {MetaKey.CONFIG: self.settings.model.to_dict(), MetaKey.EXPERIMENT: self.settings.experiment}
        replies = self._exchange(
            UTaskName.SETUP, {site: control_dxo(meta) for site in self.sites}, 0, fl_ctx, abort_signal
        )
        counts = {}
        for site in self.sites:
            count = replies[site].get_meta_prop(UMetaKey.NUM_CASES)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{site} reported {count!r} training cases")
            counts[site] = count
        return counts

    def _x0(self, replies: Mapping[str, DXO]) -> dict:
        return {
            site: dxo_to_features(dxo, DataKind.ACTIVATIONS, party=site, expected_levels=(X0_LEVEL,))[X0_LEVEL]
            for site, dxo in replies.items()
        }

    def _iteration(self, down: Mapping[str, DXO], iteration: int, fl_ctx: FLContext, abort_signal: Signal):
        """Two round trips and the middle's step; returns what the next task carries down (``dL/dx0``)."""
        replies = self._exchange(UTaskName.FORWARD, down, iteration, fl_ctx, abort_signal)
        u2 = self.trainer.forward(self._x0(replies))
        meta = {MetaKey.ITERATION: iteration}
        down_u2 = {site: features_to_dxo({U2_LEVEL: u2[site]}, DataKind.ACTIVATIONS, meta) for site in self.sites}
        replies = self._exchange(UTaskName.TAIL, down_u2, iteration, fl_ctx, abort_signal)
        du2 = {
            site: dxo_to_features(dxo, DataKind.GRADIENTS, party=site, expected_levels=(U2_LEVEL,))[U2_LEVEL]
            for site, dxo in replies.items()
        }
        losses = {site: float(dxo.get_meta_prop(UMetaKey.LOSS)) for site, dxo in replies.items()}
        self.record.add_losses(losses)
        dx0 = self.trainer.backward(du2)
        if iteration % self.settings.log_every == 0 or iteration == 1:
            self.log_info(fl_ctx, f"iteration {iteration}: loss per hospital {losses}")
        meta = {MetaKey.ITERATION: iteration + 1}
        return {site: features_to_dxo({X0_LEVEL: dx0[site]}, DataKind.GRADIENTS, meta) for site in self.sites}

    def _average(self, down, round_index: int, correction, fl_ctx: FLContext, abort_signal: Signal) -> dict:
        """``u_collect``: deliver the last ``dL/dx0``, take the heads and tails, average (and correct) them."""
        for dxo in down.values():
            dxo.set_meta_prop(UMetaKey.ROUND, round_index + 1)
        replies = self._exchange(UTaskName.COLLECT, down, self.record.iterations, fl_ctx, abort_signal)
        uploads = {site: dxo_to_parts(dxo, party=site) for site, dxo in replies.items()}
        counts = {site: dxo.get_meta_prop(UMetaKey.NUM_CASES) for site, dxo in replies.items()}
        if counts != self.record.hospitals:
            raise ValueError(
                f"case counts {counts} at round {round_index + 1} differ from setup's {self.record.hospitals}"
            )
        averaged = average_parts(uploads, counts, round_index, correction)
        self.log_info(fl_ctx, f"round {round_index + 1}: averaged heads and tails of {sorted(uploads)}")
        return averaged

    def _validate(self, down, round_number: int, iteration: int, fl_ctx: FLContext, abort_signal: Signal) -> None:
        """``u_validate`` until every hospital reports its Dice; the middle answers each window batch."""
        replies = self._exchange(UTaskName.VALIDATE, down, iteration, fl_ctx, abort_signal)
        dice: dict[str, dict] = {}
        hd95: dict[str, dict] = {}
        while True:
            waiting = {site: dxo for site, dxo in replies.items() if dxo.data_kind != DataKind.CONTROL}
            for site, dxo in replies.items():
                if site not in waiting:
                    dice[site] = dict(dxo.get_meta_prop(UMetaKey.DICE))
                    hd95[site] = dict(dxo.get_meta_prop(UMetaKey.HD95) or {})
            if not waiting:
                break
            u2 = self.trainer.infer(self._x0(waiting))
            meta = {UMetaKey.ROUND: round_number}
            batch = {site: features_to_dxo({U2_LEVEL: u2[site]}, DataKind.ACTIVATIONS, meta) for site in waiting}
            replies = self._exchange(UTaskName.VALIDATE, batch, iteration, fl_ctx, abort_signal)
        self.record.add_validation(round_number, iteration, dice, hd95)
        self.log_info(fl_ctx, f"validation after round {round_number}: Dice per hospital {dice}")
