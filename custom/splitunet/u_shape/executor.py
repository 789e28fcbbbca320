"""FLARE executor of a hospital in the U-shaped job: adapts :class:`~splitunet.u_shape.hospital_trainer.HospitalTrainer`
to the tasks of :mod:`splitunet.u_shape.protocol`.

Images, labels, predictions and the skip ``x0``'s local gradient never leave the hospital: replies carry ``x0``,
``dL/du2``, the loss value, head and tail weights at the end of a round, and the validation Dice, each through the
hospital's task-result filters.

With DP-SGD (the executor's ``dp`` and ``dp_steps``, :mod:`splitunet.dp`) the hospital fixes its budget at the setup
task and checks it against its own ``max_epsilon`` (``local/privacy.json``; a hospital with a cap refuses a job without
DP-SGD too) before its reply leaves, as the split sites do (:mod:`splitunet.flare.executor`); it records the epsilon
spent after every round in its log and in ``results.json`` in its run folder (``dp``).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from nvflare.apis.dxo import DataKind as FlareDataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from splitunet.atomic_files import write_json_atomic
from splitunet.checkpoint import save_checkpoint
from splitunet.compute.devices import configure_threads, select_device
from splitunet.data.case_keys import PrivateNames
from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.hospital_settings import load_hospital_settings
from splitunet.dp.party_record import PrivacyRecord, admit_job
from splitunet.errors import SplitUNetConfigError
from splitunet.flare.executor import RESULTS_FILE, check_dp_arguments
from splitunet.flare.guarded_executor import GuardedTaskExecutor
from splitunet.flare.nvflare_compat import send_scalar
from splitunet.flare.site_minimum import PRIVACY_FILE
from splitunet.flare.workspace_paths import checkpoint_folder, run_dir, site_config_dir
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.hospital_trainer import HospitalTrainer
from splitunet.u_shape.protocol import U2_LEVEL, X0_LEVEL, UMetaKey, UTaskName
from splitunet.u_shape.weights_transport import dxo_to_parts, parts_to_dxo
from splitunet.wire.protocol import DataKind, MetaKey
from splitunet.wire.transport import control_dxo, dxo_to_features, features_to_dxo, register_tensor_support

__all__ = ["UShapeHospitalExecutor", "CHECKPOINT_FILE"]

# The hospital's head and tail as the run left them (the federation's last average), in its checkpoint folder.
CHECKPOINT_FILE = "u_shape_hospital_last.pt"


class UShapeHospitalExecutor(GuardedTaskExecutor):
    """Runs one hospital of the U-shaped split (head and tail, loss and labels; Yang et al., RoS-FL).

    The hospital reads its data folder from its own settings (``hospital_dir`` in ``local/splitunet_site.json`` or
    ``$SPLITUNET_SITE_CONFIG``, see :mod:`splitunet.data.hospital_settings`), so one client app serves every
    hospital.

    Args:
        device: ``"auto"`` (CUDA if this hospital has a GPU, else CPU) or a torch device name.
        num_threads: torch CPU threads; 0 keeps torch's default (or ``$SPLITUNET_TORCH_THREADS``).
        dp: DP-SGD settings of head and tail (:class:`~splitunet.dp.DPSettings`, with ``poisson_sampling`` false:
            docs/dp.md); ``None`` trains without.
        dp_steps: with ``dp``: the most training steps the job may take at this hospital (the workflow's rounds
            times iterations per round); the epsilon is projected for them and a step beyond them is refused.

    Raises:
        SplitUNetConfigError: a malformed argument, when FLARE builds the executor (the message names it).
    """

    def __init__(self, device: str = "auto", num_threads: int = 0, dp=None, dp_steps: int | None = None):
        super().__init__()
        if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 0:
            raise SplitUNetConfigError(f"num_threads must be an int >= 0, got {num_threads!r}")
        self.dp = check_dp_arguments(dp, dp_steps)
        self.dp_steps = dp_steps
        self.device_name = device
        self.num_threads = num_threads
        self.trainer: HospitalTrainer | None = None
        self.checkpoints: Path | None = None
        # With DP-SGD: the hospital's record (results.json in its run folder), once it admitted the job.
        self.privacy: PrivacyRecord | None = None
        self.results_path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            register_tensor_support()
            configure_threads(self.num_threads)

    def task_handlers(self):
        return {
            UTaskName.SETUP: self._setup,
            UTaskName.FORWARD: self._forward,
            UTaskName.TAIL: self._tail,
            UTaskName.COLLECT: self._collect,
            UTaskName.VALIDATE: self._validate,
        }

    # ------------------------------------------------------------------------------------------------ tasks
    def _setup(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        config = UShapeConfig.from_dict(dxo.get_meta_prop(MetaKey.CONFIG))
        settings = load_hospital_settings(party, site_config_dir(fl_ctx))
        self.private = PrivateNames()
        # A secret of this run only: errors name cases by a key nobody else can check against a guess.
        self.private.use_secret(secrets.token_hex(16))
        self.private.add_dir("data_dir", settings.data_dir)
        folder = HospitalFolder(settings.data_dir, settings.layout, party=party)
        self.private.add_cases(folder.case_ids)
        self.trainer = HospitalTrainer(folder, select_device(self.device_name))
        self.trainer.build(config)
        self.checkpoints = checkpoint_folder(fl_ctx, settings.checkpoint_dir, dxo.get_meta_prop(MetaKey.EXPERIMENT))
        self.log_info(
            fl_ctx,
            f"{party}: {len(self.trainer.train_cases)} training and {len(self.trainer.val_cases)} held-out cases "
            f"from {settings.data_dir} (layout {settings.layout}, settings {settings.source}), device "
            f"{self.trainer.device}, checkpoints in {self.checkpoints}",
        )
        self._admit(party, fl_ctx)
        return control_dxo({UMetaKey.NUM_CASES: self.trainer.num_train_cases}).to_shareable()

    def _admit(self, party: str, fl_ctx: FLContext) -> None:
        """Fix the DP-SGD budget and check it against the hospital's epsilon cap, before the setup reply leaves.

        Raises:
            EpsilonCapExceeded: the projected epsilon exceeds the cap, or the job trains without DP-SGD and the
                hospital states a cap (the message names the cap and the projection only).
        """
        self.privacy, lines = admit_job(
            party, self.dp, self.dp_steps, self.trainer, site_config_dir(fl_ctx) / PRIVACY_FILE
        )
        for line in lines:
            self.log_info(fl_ctx, f"{party}: {line}")
        if self.privacy is not None:
            self.results_path = run_dir(fl_ctx) / RESULTS_FILE
            self._write_results()

    def _write_results(self) -> None:
        trainer = self.trainer
        content = {
            "party": trainer.party,
            "train_cases": trainer.num_train_cases,
            "steps_applied": trainer.steps_applied,
            "dp": self.privacy.to_json(),
        }
        write_json_atomic(content, self.results_path)

    def _require_trainer(self) -> HospitalTrainer:
        if self.trainer is None:
            raise RuntimeError("the setup task has not run at this hospital")
        return self.trainer

    def _forward(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        trainer = self._require_trainer()
        seconds = 0.0
        if dxo.data_kind == DataKind.GRADIENTS:
            dx0 = dxo_to_features(dxo, DataKind.GRADIENTS, party="server", expected_levels=(X0_LEVEL,))[X0_LEVEL]
            _, seconds = trainer.timed(trainer.finish_step, dx0)
        elif dxo.data_kind == FlareDataKind.WEIGHTS:
            trainer.load_parts(dxo_to_parts(dxo, party="server"))
        elif dxo.data_kind != DataKind.CONTROL:
            raise ValueError(f"{UTaskName.FORWARD} carries data kind {dxo.data_kind!r}")
        x0, forward_s = trainer.timed(trainer.forward)
        meta = {MetaKey.ITERATION: dxo.get_meta_prop(MetaKey.ITERATION), MetaKey.SITE_COMPUTE_S: seconds + forward_s}
        return features_to_dxo({X0_LEVEL: x0}, DataKind.ACTIVATIONS, meta).to_shareable()

    def _tail(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        trainer = self._require_trainer()
        u2 = dxo_to_features(dxo, DataKind.ACTIVATIONS, party="server", expected_levels=(U2_LEVEL,))[U2_LEVEL]
        (du2, loss), seconds = trainer.timed(trainer.tail_step, u2)
        meta = {
            MetaKey.ITERATION: dxo.get_meta_prop(MetaKey.ITERATION),
            UMetaKey.LOSS: loss,
            MetaKey.SITE_COMPUTE_S: seconds,
        }
        return features_to_dxo({U2_LEVEL: du2}, DataKind.GRADIENTS, meta).to_shareable()

    def _collect(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        trainer = self._require_trainer()
        dx0 = dxo_to_features(dxo, DataKind.GRADIENTS, party="server", expected_levels=(X0_LEVEL,))[X0_LEVEL]
        trainer.finish_step(dx0)
        meta = {UMetaKey.NUM_CASES: trainer.num_train_cases, UMetaKey.ROUND: dxo.get_meta_prop(UMetaKey.ROUND)}
        if self.privacy is not None:
            # The round's weights leave now: what they spent is on record (the average is post-processing).
            epsilon = trainer.epsilon()
            self.privacy.spent(epsilon, trainer.private.steps_taken, round=meta[UMetaKey.ROUND])
            self.log_info(fl_ctx, f"{party}: round {meta[UMetaKey.ROUND]}: {self.privacy.line()}")
            # To the server's TensorBoard (the DP job forwards the hospitals' analytics).
            send_scalar(self, fl_ctx, "dp_epsilon", epsilon, int(meta[UMetaKey.ROUND]))
            self._write_results()
        return parts_to_dxo(trainer.parts_state(), meta).to_shareable()

    def _validate(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        trainer = self._require_trainer()
        if dxo.data_kind == FlareDataKind.WEIGHTS:
            trainer.load_parts(dxo_to_parts(dxo, party="server"))
            if dxo.get_meta_prop(UMetaKey.FINAL):
                path = save_checkpoint(trainer.state_dict(), self.checkpoints / CHECKPOINT_FILE)
                self.log_info(fl_ctx, f"{party}: saved the federation's head and tail to {path}")
            trainer.start_validation()
        elif dxo.data_kind == DataKind.ACTIVATIONS:
            u2 = dxo_to_features(dxo, DataKind.ACTIVATIONS, party="server", expected_levels=(U2_LEVEL,))[U2_LEVEL]
            trainer.take_windows(u2)
        else:
            raise ValueError(f"{UTaskName.VALIDATE} carries data kind {dxo.data_kind!r}")
        x0, seconds = trainer.timed(trainer.next_windows)
        meta = {UMetaKey.ROUND: dxo.get_meta_prop(UMetaKey.ROUND), MetaKey.SITE_COMPUTE_S: seconds}
        if x0 is None:
            dice, hd95 = trainer.validation_scores()
            self.log_info(fl_ctx, f"{party}: validation Dice {dice}, HD95 {hd95}")
            return control_dxo({**meta, UMetaKey.DICE: dice, UMetaKey.HD95: hd95}).to_shareable()
        return features_to_dxo({X0_LEVEL: x0}, DataKind.ACTIVATIONS, meta).to_shareable()
