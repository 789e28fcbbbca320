"""FLARE executor of a modality site: adapts :class:`~splitunet.site.trainer.SiteTrainer` to FLARE tasks.

With DP-SGD (the executor's ``dp`` and ``dp_steps``, :mod:`splitunet.dp`) the site fixes its budget at the training
setup task, from the job's DP settings, the most steps the job may take (``dp_steps``) and its number of cases, checks
it against its own ``max_epsilon`` (``local/privacy.json``, :mod:`splitunet.dp.site_cap`; a site with a cap refuses any
training job without DP-SGD too), all before its reply (its case list) leaves; then it records the epsilon spent at
every save and every encoder averaging in its log and in ``results.json`` in its run folder (``dp``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from nvflare.apis.dxo import DataKind as FlareDataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from splitunet.atomic_files import write_json_atomic
from splitunet.checkpoint import save_checkpoint
from splitunet.compute.devices import configure_threads, select_device
from splitunet.data.case_keys import PrivateNames
from splitunet.data.nifti_io import geometry_header
from splitunet.data.party_data import ModalityFolder
from splitunet.data.party_settings import load_site_settings
from splitunet.dp.dp_settings import DPSettings
from splitunet.dp.opacus_extra import opacus_installed
from splitunet.dp.party_record import PrivacyRecord, admit_job
from splitunet.errors import SplitUNetConfigError
from splitunet.filters.quantize_features import common_sender_bits
from splitunet.flare.encoder_weights import dxo_to_encoder, encoder_to_dxo
from splitunet.flare.guarded_executor import GuardedTaskExecutor, site_error_message
from splitunet.flare.nvflare_compat import send_scalar
from splitunet.flare.site_minimum import PRIVACY_FILE, check_minimum_defense, released_chains
from splitunet.flare.workspace_paths import checkpoint_folder, run_dir, site_config_dir
from splitunet.resume import CHECKPOINT_TAGS, encoder_checkpoint, load_for_resume
from splitunet.site.encoder_release import check_share_encoder, read_share_encoder
from splitunet.site.nopeek import NoPeekSettings
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import DataKind, MetaKey, TaskName
from splitunet.wire.transport import control_dxo, dxo_to_features, features_to_dxo, register_tensor_support

__all__ = ["SplitSiteExecutor", "site_error_message", "RESULTS_FILE", "check_dp_arguments"]

# The site's own record of its run (with DP-SGD), in its run folder.
RESULTS_FILE = "results.json"


def _amp_note(requested: bool, applied: bool) -> str:
    if applied:
        return ", training under bfloat16 autocast"
    return ", amp ignored on this device (AMP is for CUDA), training in float32" if requested else ""


def check_dp_arguments(dp, dp_steps) -> DPSettings | None:
    """The DP-SGD arguments of a split party's executor, checked when FLARE builds it.

    Args:
        dp: the job's ``"dp"`` entry (:class:`~splitunet.dp.DPSettings`), or ``None``.
        dp_steps: with ``dp``, the most training steps the job may take at the party (its epsilon is projected for
            them, and a step beyond them is refused).

    Returns:
        the settings, or ``None`` without DP-SGD.

    Raises:
        SplitUNetConfigError: a malformed entry, Poisson sampling, ``dp_steps`` missing or without ``dp``, or Opacus not
            installed.
    """
    settings = DPSettings.from_config(dp)
    if settings is None:
        if dp_steps is not None:
            raise SplitUNetConfigError(f"dp_steps {dp_steps!r} is set, but the job has no dp settings")
        return None
    if isinstance(dp_steps, bool) or not isinstance(dp_steps, int) or dp_steps < 1:
        raise SplitUNetConfigError(
            f"dp_steps must be an int >= 1 with dp (the most steps the job may take here), got {dp_steps!r}"
        )
    if settings.poisson_sampling:
        # The server chooses the batches (or knows their seed): docs/dp.md, "Sampling".
        raise SplitUNetConfigError(
            "dp: a split party does not draw its own batches, so there is no sampling to amplify by: set "
            "poisson_sampling false (every case of a batch contributes once, sample rate 1)"
        )
    if not opacus_installed():
        # Said when FLARE builds the job, not at the first step.
        raise SplitUNetConfigError("this job trains with DP-SGD, which needs Opacus: pip install 'splitunet[dp]'")
    return settings


class SplitSiteExecutor(GuardedTaskExecutor):
    """Runs one modality site of Split-U-Net.

    The site reads its modality and data folder from its own settings (``local/splitunet_site.json`` or
    ``$SPLITUNET_SITE_CONFIG``), so one client app serves every site of a consortium. Images and labels never leave
    the site: replies carry features (as filtered by the site's result filters), and encoder weights only when
    other sites hold the same modality and the server averages their encoders (``split_average``, through the same
    result filters; docs/topologies.md, "Several sites per modality").

    Args:
        device: ``"auto"`` (CUDA if this site has a GPU, else CPU) or a torch device name.
        num_threads: torch CPU threads; 0 keeps torch's default (or ``$SPLITUNET_TORCH_THREADS``).
        amp: train the encoder under bfloat16 autocast (for GPUs; see :mod:`splitunet.compute.mixed_precision`). A
            site's own choice: features still leave in the job's wire precision. Not with ``dp``.
        dp: DP-SGD settings of the encoder's training (:class:`~splitunet.dp.DPSettings`, with ``poisson_sampling``
            false: docs/dp.md); ``None`` trains without.
        dp_steps: with ``dp``: the most training steps the job may take at this site (the workflow's
            ``num_iterations``); the epsilon is projected for them and a step beyond them is refused.
        nopeek: NoPeek's distance-correlation penalty on the encoder's training
            (:class:`~splitunet.site.nopeek.NoPeekSettings`: ``weight``, ``positions``, ``levels``); ``None`` trains
            without. Not with ``dp``.

    Raises:
        SplitUNetConfigError: a malformed argument, when FLARE builds the executor (the message names it).
    """

    def __init__(
        self,
        device: str = "auto",
        num_threads: int = 0,
        amp: bool = False,
        dp=None,
        dp_steps: int | None = None,
        nopeek=None,
    ):
        super().__init__()
        if not isinstance(num_threads, int) or num_threads < 0:
            raise SplitUNetConfigError(f"num_threads must be an int >= 0, got {num_threads!r}")
        if not isinstance(amp, bool):
            raise SplitUNetConfigError(f"amp must be true or false, got {amp!r}")
        self.dp = check_dp_arguments(dp, dp_steps)
        if self.dp is not None and amp:
            raise SplitUNetConfigError("amp and dp cannot be combined: DP-SGD trains the encoder in float32 here")
        self.dp_steps = dp_steps
        self.nopeek = NoPeekSettings.from_config(nopeek)
        if self.nopeek is not None and self.dp is not None:
            raise SplitUNetConfigError("nopeek and dp cannot be combined (splitunet.site.nopeek)")
        self.device_name = device
        self.amp = amp
        self.num_threads = num_threads
        self.trainer: SiteTrainer | None = None
        self.checkpoints: Path | None = None
        # With DP-SGD: the site's record (results.json in its run folder), once it admitted the job.
        self.privacy: PrivacyRecord | None = None
        self.results_path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            register_tensor_support()
            configure_threads(self.num_threads)

    def task_handlers(self):
        return {
            TaskName.SETUP: self._setup,
            TaskName.STEP: self._step,
            TaskName.ENCODE: self._encode,
            TaskName.SAVE: self._save,
            TaskName.AVERAGE: self._average,
        }

    def _setup(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        # Before anything is read or sent: this job must run the site's minimum defense on what it releases.
        config = SplitModelConfig.from_dict(dxo.get_meta_prop(MetaKey.CONFIG))
        checked = check_minimum_defense(fl_ctx, party, config, self.nopeek)
        if checked:
            self.log_info(fl_ctx, f"{party}: {checked}")
        self.private = PrivateNames()
        settings = load_site_settings(party, site_config_dir(fl_ctx))
        self.private.use_secret(settings.case_key_secret)
        self.private.add_dir("data_dir", settings.data_dir)
        self.private.add_dir("inference_dir", settings.inference_dir)
        device = select_device(self.device_name)
        inference = dxo.get_meta_prop(MetaKey.INFERENCE)
        data_dir = (settings.inference_dir or settings.data_dir) if inference else settings.data_dir
        folder = ModalityFolder(data_dir, settings.modality, party=party)
        self.private.add_dir("inference_dir" if inference and settings.inference_dir else "data_dir", folder.folder)
        self.private.add_cases(folder.case_ids)
        self.trainer = SiteTrainer(folder, settings.case_key_secret, device, amp=self.amp)
        self.trainer.build(config, settings.encoder_seed)
        if self.nopeek is not None:
            self.trainer.plan_nopeek(self.nopeek)
        # Quantized on the device when every releasing chain starts with the same quantizer (it still checks them).
        self.trainer.wire_bits = common_sender_bits(released_chains(fl_ctx).values())
        self.checkpoints = checkpoint_folder(fl_ctx, settings.checkpoint_dir, dxo.get_meta_prop(MetaKey.EXPERIMENT))
        compute = f"device {device}" + _amp_note(self.amp, self.trainer.amp)
        if self.trainer.wire_bits is not None:
            compute += f", features quantized to {self.trainer.wire_bits}-bit codes on the device"
        if self.nopeek is not None:
            frozen = "" if config.train_encoders else " (no effect: the job freezes the encoders)"
            compute += f", NoPeek weight {self.nopeek.weight:g}{frozen}"
        self.log_info(
            fl_ctx,
            f"{party}: modality {settings.modality}, {len(self.trainer.key_to_case)} cases from {data_dir} "
            f"(settings {settings.source}), {compute}, checkpoints in {self.checkpoints}",
        )
        if not inference:
            # Before the reply (the case list) leaves, and before a resumed encoder is loaded.
            self._admit(party, fl_ctx)
        resume = dxo.get_meta_prop(MetaKey.RESUME)
        if resume:
            path = encoder_checkpoint(self.checkpoints, settings.modality, "last")
            state = load_for_resume(path, party, resume["iteration"], self.trainer.config.to_dict())
            self.trainer.load_state_dict(state)
            self.log_info(fl_ctx, f"{party}: resumed from {path} (iteration {resume['iteration']})")
            self._record_privacy(party, resume["iteration"], fl_ctx)
        meta = {MetaKey.MODALITY: settings.modality, MetaKey.CASES: self.trainer.describe_cases()}
        if inference:
            path = encoder_checkpoint(self.checkpoints, settings.modality, inference["tag"])
            config = self.trainer.config.to_dict()
            self.trainer.load_state_dict(load_for_resume(path, party, None, config, purpose="run inference"))
            self.log_info(fl_ctx, f"{party}: encoding new cases with {path}")
            if inference.get("headers"):
                # The grid of each case, so that the server writes segmentations on it; no voxels, no free text.
                # The server asks one site only: every site's grid is the same (checked by affine digest).
                meta[MetaKey.HEADERS] = {
                    key: geometry_header(folder.header(case_id)) for key, case_id in self.trainer.key_to_case.items()
                }
        return control_dxo(meta).to_shareable()

    def _admit(self, party: str, fl_ctx: FLContext) -> None:
        """Fix the DP-SGD budget of a training job and check it against the site's epsilon cap.

        Raises:
            EpsilonCapExceeded: the projected epsilon exceeds the cap, or the job trains without DP-SGD and the site
                states a cap (the message names the cap and the projection only).
        """
        self.privacy, lines = admit_job(
            party, self.dp, self.dp_steps, self.trainer, site_config_dir(fl_ctx) / PRIVACY_FILE
        )
        for line in lines:
            self.log_info(fl_ctx, f"{party}: {line}")
        if self.privacy is not None:
            self.results_path = run_dir(fl_ctx) / RESULTS_FILE
            self._write_results()

    def _record_privacy(self, party: str, iteration, fl_ctx: FLContext) -> None:
        """With DP-SGD: log the epsilon spent so far and keep it in ``results.json``."""
        if self.privacy is None:
            return
        epsilon = self.trainer.epsilon()
        self.privacy.spent(epsilon, self.trainer.private.steps_taken, iteration=iteration)
        self.log_info(fl_ctx, f"{party}: iteration {iteration}: {self.privacy.line()}")
        # To the server's TensorBoard where the job forwards the sites' analytics (the DP jobs do).
        send_scalar(self, fl_ctx, "dp_epsilon", epsilon, int(iteration))
        self._write_results()

    def _write_results(self) -> None:
        trainer = self.trainer
        content = {
            "party": trainer.party,
            "modality": trainer.modality,
            "steps_applied": trainer.steps_applied,
            "averages_loaded": trainer.averages_loaded,
            "dp": self.privacy.to_json(),
        }
        write_json_atomic(content, self.results_path)

    def _require_trainer(self) -> SiteTrainer:
        if self.trainer is None:
            raise RuntimeError("the setup task has not run at this site")
        return self.trainer

    def _step(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        trainer = self._require_trainer()
        compute_s = 0.0
        if dxo.data_kind == DataKind.GRADIENTS:
            grads = dxo_to_features(dxo, DataKind.GRADIENTS, party=party, keep_encoded=True)
            _, seconds = trainer.timed(trainer.backward, grads)
            compute_s += seconds
        elif dxo.data_kind != DataKind.CONTROL:
            raise ValueError(f"step task carries data kind {dxo.data_kind!r}; expected gradients or control")
        plan = dxo.get_meta_prop(MetaKey.PLAN)
        meta = {MetaKey.ITERATION: dxo.get_meta_prop(MetaKey.ITERATION)}
        if plan is None:
            meta[MetaKey.SITE_COMPUTE_S] = compute_s
            return control_dxo(meta).to_shareable()
        features, seconds = trainer.timed(trainer.forward, plan)
        meta[MetaKey.SITE_COMPUTE_S] = compute_s + seconds
        # The server's own plan, echoed so that server-side filters (captures) know which crops they see.
        meta[MetaKey.PLAN] = plan
        return features_to_dxo(features, DataKind.ACTIVATIONS, meta).to_shareable()

    def _encode(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        trainer = self._require_trainer()
        plan = dxo.get_meta_prop(MetaKey.PLAN)
        features, seconds = trainer.timed(trainer.encode, plan)
        meta = {MetaKey.SITE_COMPUTE_S: seconds, MetaKey.PLAN: plan}
        return features_to_dxo(features, DataKind.ACTIVATIONS, meta).to_shareable()

    def _average(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        """Averaging with the sites sharing this modality: upload the encoder, or take the average.

        Gradients or a control DXO: apply the gradients (of this site's last step, if any) and reply with the
        encoder's weights (a ``WEIGHTS`` DXO, through this site's result filters), if the site's policy lets its
        encoder leave (:mod:`splitunet.site.encoder_release`; else the task is refused before anything changes). A
        ``WEIGHTS`` DXO: the average, which replaces the encoder's weights (the optimiser's moments stay this site's
        own); with FedProx (the job's ``fedprox_mu`` in its meta) it is also the anchor of the proximal term until the
        next average (:class:`~splitunet.site.trainer.SiteTrainer`).
        """
        trainer = self._require_trainer()
        meta = {MetaKey.ITERATION: dxo.get_meta_prop(MetaKey.ITERATION)}
        if dxo.data_kind == FlareDataKind.WEIGHTS:
            expected = {name: tuple(value.shape) for name, value in trainer.encoder.state_dict().items()}
            weights = dxo_to_encoder(dxo, party="server", expected=expected)
            mu = dxo.get_meta_prop(MetaKey.FEDPROX_MU, 0.0)
            trainer.load_encoder_weights(
                {name: torch.from_numpy(array.copy()) for name, array in weights.items()}, fedprox_mu=mu
            )
            fedprox = f", FedProx mu {trainer.fedprox_mu:g} towards it" if trainer.fedprox_mu else ""
            self.log_info(
                fl_ctx,
                f"{party}: took the average of the {trainer.modality} encoders at iteration "
                f"{meta[MetaKey.ITERATION]}{fedprox}",
            )
            return control_dxo(meta).to_shareable()
        # Read at every upload, not once: the site's policy, not the job, decides whether its encoder may leave.
        check_share_encoder(read_share_encoder(site_config_dir(fl_ctx) / PRIVACY_FILE), party)
        compute_s = 0.0
        if dxo.data_kind == DataKind.GRADIENTS:
            grads = dxo_to_features(dxo, DataKind.GRADIENTS, party=party, keep_encoded=True)
            _, compute_s = trainer.timed(trainer.backward, grads)
        elif dxo.data_kind != DataKind.CONTROL:
            raise ValueError(f"{TaskName.AVERAGE} carries data kind {dxo.data_kind!r}; expected gradients or control")
        meta[MetaKey.SITE_COMPUTE_S] = compute_s
        # The weights leave now: what they spent so far is on record (the average is post-processing).
        self._record_privacy(party, meta[MetaKey.ITERATION], fl_ctx)
        return encoder_to_dxo(trainer.encoder_weights(), meta).to_shareable()

    def _save(self, dxo, party: str, fl_ctx: FLContext) -> Shareable:
        trainer = self._require_trainer()
        tag = dxo.get_meta_prop(MetaKey.TAG)
        if tag not in CHECKPOINT_TAGS:
            raise ValueError(f"checkpoint tag must be one of {CHECKPOINT_TAGS}, got {tag!r}")
        if trainer.steps_in_flight:
            # The server empties its pipeline before every save (docs/design.md, "Pipelined steps"); a checkpoint
            # without the gradients still to come would resume a different run.
            raise RuntimeError(
                f"asked to save while {trainer.steps_in_flight} training steps' gradients are still pending; the "
                "checkpoint would miss them"
            )
        state = trainer.state_dict()
        state[MetaKey.ITERATION] = dxo.get_meta_prop(MetaKey.ITERATION)
        path = save_checkpoint(state, encoder_checkpoint(self.checkpoints, trainer.modality, tag))
        self.log_info(fl_ctx, f"{party}: saved {tag} encoder checkpoint to {path}")
        if trainer.nopeek is not None and trainer.nopeek.last:
            levels = ", ".join(f"x{level} {value:.2f}" for level, value in trainer.nopeek.last.items())
            self.log_info(fl_ctx, f"{party}: NoPeek distance correlation at the last step: {levels}")
        if tag == "last":
            self._record_privacy(party, state[MetaKey.ITERATION], fl_ctx)
        return control_dxo({MetaKey.SAVED_PATH: str(path)}).to_shareable()
