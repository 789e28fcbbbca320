"""FLARE server workflow of Split-U-Net: adapts :class:`~splitunet.server.trainer.ServerTrainer` to FLARE tasks.

The workflow sends tasks, waits for the sites and hands their replies on; what to do with them lives in plain
modules of :mod:`splitunet.server` (settings, case matching, the run record, validation, checkpoints).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from splitunet.compute.devices import select_device
from splitunet.data.labels import get_layout
from splitunet.data.party_data import LabelFolder
from splitunet.data.party_settings import load_server_settings
from splitunet.errors import SplitUNetConfigError
from splitunet.flare import job_filters
from splitunet.flare.encoder_averaging import EncoderAveraging, make_correction
from splitunet.flare.encoder_weights import dxo_to_encoder, encoder_to_dxo, weights_bytes
from splitunet.flare.nvflare_compat import send_scalar
from splitunet.flare.site_tasks import SITE_FAILURE_POLICIES, SentTasks, SiteTaskController, SplitRunError
from splitunet.flare.workspace_paths import checkpoint_folder, site_config_dir
from splitunet.networks.optimizer import OPTIMIZER_NAME
from splitunet.server import cases
from splitunet.server.checkpointing import load_resume_state, restore_server_state, save_server_state
from splitunet.server.cohorts import Cohort, CohortPlanner, match_cohorts
from splitunet.server.decoder_inputs import check_sent_levels, modality_groups
from splitunet.server.private_details import DETAILS_FILE, PrivateDetails
from splitunet.server.run_record import TrainingRecord
from splitunet.server.run_settings import EXPERIMENT_NAME, MODEL_DEFAULTS, TrainingSettings
from splitunet.server.site_roster import SiteRoster
from splitunet.server.sliding_window import EncodeFn
from splitunet.server.trainer import ServerTrainer
from splitunet.server.validation import Validation
from splitunet.wire.protocol import DataKind, MetaKey, TaskName
from splitunet.wire.transport import control_dxo, features_to_dxo, payload_bytes

__all__ = ["SplitLearningController", "SplitRunError", "SITE_FAILURE_POLICIES", "EXPERIMENT_NAME"]

# Offsets the modality-dropout generator from the crop sampler's, which uses the seed itself.
_MODALITY_DROPOUT_SEED_OFFSET = 7919


@dataclass
class _StepTask:
    """A training step's task, sent to the sites; the server's step waits for its replies.

    Attributes:
        cohort_index: the cohort the step trains.
        plan: the crops it encodes.
        participants: the sites asked to encode them.
        sent: the tasks.
        started: ``time.perf_counter()`` before sending.
        round_trip_s: seconds from ``started`` until every reply was in.
    """

    cohort_index: int
    plan: dict
    participants: list[str]
    sent: SentTasks
    started: float
    round_trip_s: float = 0.0


class SplitLearningController(SiteTaskController):
    """Server workflow of Split-U-Net (Roth et al., DeCaF@MICCAI 2022) over FLARE tasks.

    Every iteration sends each site ONE task that carries the gradients of the previous step and the crop plan
    of the next, so a step costs one round trip. Crops are chosen without looking at labels (keys, origins and
    flips are the same at every site, keeping the modalities voxel-aligned). Task data and results pass through
    FLARE's filters in both directions.

    With ``pipeline_delay`` 1 the task of step ``t+1`` goes out as soon as the features of step ``t`` are in, before
    the server's step ``t``: the sites encode (and FLARE moves the bytes) while the server decodes, and the
    gradients of step ``t`` reach each site with the task of step ``t+2``, one step later than lock-step. The tasks and
    their filters are the same; only their timing changes. Before an averaging, a validation or a checkpoint the
    pipeline empties (no step goes out ahead, the pending gradients go out with no plan during the server's step),
    so those and a resume see what lock-step leaves (docs/design.md, "Pipelined steps").

    Several sites may hold one modality, each for other patients (SplitFed; docs/topologies.md, "Several sites per
    modality"): each step then trains on one cohort, the sites that hold a set of cases together
    (:mod:`splitunet.server.cohorts`), through the decoder's one input per modality, and every
    ``encoder_averaging_every`` iterations the encoders of each modality's sites are averaged
    (:class:`~splitunet.flare.encoder_averaging.EncoderAveraging`).

    Its arguments are the fields of :class:`~splitunet.server.run_settings.TrainingSettings`, which documents and
    checks them; the model's defaults are :class:`~splitunet.wire.model_config.SplitModelConfig`'s.
    """

    record_class = TrainingRecord

    def __init__(
        self,
        num_iterations: int = 200,
        batch_size: int = 2,
        crop_size: Sequence[int] = (48, 48, 48),
        features: Sequence[int] = MODEL_DEFAULTS.features,
        skip_levels: Sequence[int] = MODEL_DEFAULTS.skip_levels,
        fusion: str = MODEL_DEFAULTS.fusion,
        loss: str = "dice_ce",
        learning_rate: float = MODEL_DEFAULTS.learning_rate,
        weight_decay: float = MODEL_DEFAULTS.weight_decay,
        transfer_dtype: str = MODEL_DEFAULTS.transfer_dtype,
        train_encoders: bool = MODEL_DEFAULTS.train_encoders,
        val_every: int = 100,
        num_val_cases: int = 4,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        num_preview_cases: int = 1,
        sites: Sequence[str] | None = None,
        seed: int = MODEL_DEFAULTS.seed,
        task_timeout: int = 600,
        setup_timeout: int = 600,
        on_site_failure: str = "stop",
        modality_dropout: float = 0.0,
        cohort_draw: str = "proportional",
        encoder_averaging_every: int = 10,
        drift_correction: Mapping | None = None,
        fedprox_mu: float = 0.0,
        checkpoint_every: int = 0,
        pipeline_delay: int = 0,
        experiment: str = "split_unet",
        resume: bool = False,
        task_check_period: float = 0.005,
        task_long_poll_s: float = 0.0,
        device: str = "auto",
        amp: bool = False,
        num_threads: int = 0,
        log_every: int = 10,
        analytics: bool = True,
    ):
        # The arguments are the settings' fields, by name; taken before any other local exists.
        self._use_settings(TrainingSettings(**{name: value for name, value in locals().items() if name != "self"}))
        self.model_config = self.settings.model
        self.trainer: ServerTrainer | None = None
        self.site_saved_iteration: dict[str, int] = {}
        self.checkpoints: Path | None = None
        self.details: PrivateDetails | None = None
        # Set at setup: the cohorts (one with one site per modality), which cohort holds each case, the averaging.
        self.cohorts: list[Cohort] = []
        self.cohort_of: dict[str, int] = {}
        self.groups: dict[str, list[str]] = {}
        self.averaging: EncoderAveraging | None = None
        # When the server's last training step ended (time.perf_counter()): a task sent before it was sent ahead.
        self._last_step_end = float("-inf")

    # ----------------------------------------------------------------------------------------- the run
    def _run(self, abort_signal: Signal, fl_ctx: FLContext, out_dir: Path):
        # FLARE archives the run folder, log included: an error leaving here names cases by key, and its full
        # text (case ID, label file) goes to the label holder's own local/ folder.
        self.details = PrivateDetails(site_config_dir(fl_ctx) / DETAILS_FILE, fl_ctx.get_job_id())
        try:
            self._train(abort_signal, fl_ctx, out_dir)
        except Exception as error:
            public = self.details.public_error(error)
            if public is error:
                raise
            raise public from None  # the original's text names what the run folder must not keep

    def _train(self, abort_signal: Signal, fl_ctx: FLContext, out_dir: Path):
        s, record = self.settings, self.record
        server_party = fl_ctx.get_identity_name()
        party_settings = load_server_settings(server_party, site_config_dir(fl_ctx))
        if party_settings.labels_dir is None:
            raise SplitUNetConfigError(f"{party_settings.source}: the server's entry needs 'labels_dir' to train")
        private = self.details.names
        private.use_secret(party_settings.case_key_secret)
        private.add_dir("labels_dir", party_settings.labels_dir)
        labels = LabelFolder(party_settings.labels_dir, party_settings.layout, party=server_party)
        private.add_dir("labels_dir", labels.folder)
        private.add_cases(labels.case_ids)
        layout = get_layout(party_settings.layout)
        device = select_device(s.device)
        self.trainer = ServerTrainer(
            labels, party_settings.case_key_secret, device, s.loss, amp=s.amp, pipeline_delay=s.pipeline_delay
        )
        # Quantized on the device when every chain the gradients leave through starts with the same quantizer.
        self.trainer.wire_bits = job_filters.sender_wire_bits(
            fl_ctx,
            job_filters.SERVER_CONFIG,
            "task_data_filters",
            (TaskName.STEP, TaskName.AVERAGE),
            DataKind.GRADIENTS,
        )
        if self.trainer.wire_bits is not None:
            self.log_info(fl_ctx, f"gradients quantized to {self.trainer.wire_bits}-bit codes on {device}")
        self._last_step_end = float("-inf")
        if s.amp and not self.trainer.amp:
            self.log_warning(fl_ctx, f"amp ignored on {device} (AMP is for CUDA): the decoder trains in float32")
        self.checkpoints = checkpoint_folder(fl_ctx, party_settings.checkpoint_dir, s.experiment)
        self.sites = self._sites_to_use(fl_ctx)
        saved = None
        if s.resume:
            saved, path = load_resume_state(self.checkpoints, server_party, self.model_config.to_dict())
            record.resumed_from = {"iteration": int(saved["iteration"]), "checkpoint": str(path)}
            self.site_saved_iteration = dict(saved["site_saved_iteration"])

        train_keys, val_keys, shapes = self._setup(abort_signal, fl_ctx)
        self.trainer.build(self.model_config, num_sites=len(self.groups))
        planner = CohortPlanner(
            [{key: shapes[key] for key in cohort.train_keys} for cohort in self.cohorts],
            s.crop_size,
            s.batch_size,
            seed=s.seed,
            draw=s.cohort_draw,
        )
        self.roster = SiteRoster(
            self.sites, self.site_modality, s.modality_dropout, seed=s.seed + _MODALITY_DROPOUT_SEED_OFFSET
        )
        self.averaging = self._encoder_averaging()
        shared = any(len(sites) > 1 for sites in self.groups.values())
        record.start(
            sites={site: self.site_modality[site] for site in self.sites},
            num_train_cases=len(train_keys),
            num_val_cases=len(val_keys),
            model=self.model_config.to_dict(),
            optimizer=OPTIMIZER_NAME,
            crop_size=list(s.crop_size),
            batch_size=s.batch_size,
            server_compute={
                "device": str(self.trainer.device),
                "amp": self.trainer.amp,
                "amp_requested": s.amp,
                "gradient_code_bits": self.trainer.wire_bits,
            },
            # Only where a modality has several sites: a run with one site per modality records what it always did.
            cohorts=self._describe_cohorts(planner) if shared else None,
            encoder_averaging=self.averaging.describe() if self.averaging is not None else None,
        )
        first = 1
        if saved is not None:
            first = (
                restore_server_state(
                    saved, self.trainer, planner, self.roster, record, record.sites, averaging=self.averaging
                )
                + 1
            )
            self.log_info(fl_ctx, f"resumed from iteration {first - 1} ({record.resumed_from['checkpoint']})")
        self.log_info(
            fl_ctx,
            f"training iterations {first}..{s.num_iterations} on {len(train_keys)} cases, validating on "
            f"{len(val_keys)}; sites in decoder order: {[(site, self.site_modality[site]) for site in self.sites]}"
            + (f"; cohorts: {[list(cohort.sites) for cohort in self.cohorts]}" if shared else ""),
        )
        validation = Validation(self.trainer, val_keys, shapes, layout, s)
        self._train_steps(planner, validation, first, fl_ctx, abort_signal, out_dir)

    def _train_steps(
        self,
        planner: CohortPlanner,
        validation: Validation,
        first: int,
        fl_ctx: FLContext,
        abort_signal: Signal,
        out_dir: Path,
    ) -> None:
        """Training iterations ``first..num_iterations``, with their averagings, validations and checkpoints."""
        s, record = self.settings, self.record
        # Gradients of the last step, by site: each reaches its site with the next task that site gets.
        pending: dict[str, dict] = {}
        # With pipeline_delay 1, the step task already sent for the coming iteration.
        ahead: _StepTask | None = None
        loss = float("nan")
        for iteration in range(first, s.num_iterations + 1):
            if abort_signal.triggered:
                return
            if ahead is None:
                ahead, pending = self._send_step(planner, pending, iteration, fl_ctx), {}
            task, ahead = ahead, None
            replies = self._await_replies(task.sent, iteration, fl_ctx, abort_signal)
            task.round_trip_s = time.perf_counter() - task.started
            flush = None
            if s.pipeline_delay and not self._drains_after(iteration):
                # The sites apply the gradients of step `iteration - 1` and encode step `iteration + 1` while the
                # server runs step `iteration` (docs/design.md, "Pipelined steps").
                ahead, pending = self._send_step(planner, pending, iteration + 1, fl_ctx), {}
            elif s.pipeline_delay and pending:
                # A validation, checkpoint or averaging follows: empty the pipeline, so that it finds the sites as
                # lock-step leaves them (one step's gradients pending), and no site's step is in flight at a save.
                targets = [site for site in self.roster.active if site in pending]
                flush = self._send_tasks(TaskName.STEP, self._step_data(pending, None, (), targets, iteration), fl_ctx)
                pending = {}
            step, pending = self._server_step(task, replies, iteration, first, fl_ctx)
            if flush is not None:
                self._await_replies(flush, iteration, fl_ctx, abort_signal)
            loss = step.loss if step else loss
            record.iterations = iteration
            if record.cohorts is not None:
                record.cohorts = self._describe_cohorts(planner)
            if self.averaging is not None and self.averaging.due(iteration):
                pending = self._average_encoders(pending, iteration, fl_ctx, abort_signal)
            validate = iteration % s.val_every == 0 or iteration == s.num_iterations
            if validate or (s.checkpoint_every and iteration % s.checkpoint_every == 0):
                if self.model_config.train_encoders:
                    # Deliver the pending gradients first so that every encoder is at step `iteration`.
                    targets = self._step_targets(self.cohorts[task.cohort_index], pending)
                    data = self._step_data(pending, None, (), targets, iteration)
                    self._round_trip(TaskName.STEP, data, iteration, fl_ctx, abort_signal)
                pending = {}
                is_best = validate and self._validate(validation, iteration, loss, fl_ctx, abort_signal, out_dir)
                self._save("last", iteration, planner, fl_ctx, abort_signal)
                if is_best:
                    self._save("best", iteration, planner, fl_ctx, abort_signal)
        record.summarise_steps()

    def _encoder_averaging(self) -> EncoderAveraging | None:
        """The averaging of the encoders sharing a modality, if any modality has two sites and encoders train."""
        s = self.settings
        if not self.model_config.train_encoders or not any(len(sites) > 1 for sites in self.groups.values()):
            return None
        counts = {
            site: sum(len(cohort.train_keys) for cohort in self.cohorts if site in cohort.sites) for site in self.sites
        }
        averaging = EncoderAveraging(
            self.groups, counts, s.encoder_averaging_every, make_correction(s.drift_correction), s.fedprox_mu
        )
        return averaging if averaging.enabled else None

    def _describe_cohorts(self, planner: CohortPlanner) -> list[dict]:
        return [cohort.describe(self.site_modality, steps) for cohort, steps in zip(self.cohorts, planner.steps)]

    def _available_cohorts(self) -> list[bool]:
        """Per cohort, whether any of its sites still takes part."""
        active = set(self.roster.active)
        return [any(site in active for site in cohort.sites) for cohort in self.cohorts]

    def _step_targets(self, cohort: Cohort, pending: Mapping[str, dict]) -> list[str]:
        """The sites a step task goes to: the cohort's active sites and every site with gradients to take.

        With one cohort these are all the active sites, as in a run without cohorts."""
        return [site for site in self.roster.active if site in cohort.sites or site in pending]

    def _drains_after(self, iteration: int) -> bool:
        """Whether an averaging, validation or checkpoint follows ``iteration``: no step may be sent ahead of it."""
        s = self.settings
        return (
            iteration == s.num_iterations
            or iteration % s.val_every == 0
            or bool(s.checkpoint_every and iteration % s.checkpoint_every == 0)
            or (self.averaging is not None and self.averaging.due(iteration))
        )

    def _send_step(self, planner: CohortPlanner, pending, iteration: int, fl_ctx: FLContext) -> _StepTask:
        """Plan step ``iteration`` and send its task: the pending gradients out, a request for its features.

        The task goes to the cohort's active sites and to every site with gradients to take; it returns at once
        (:meth:`_await_replies` waits for the replies).
        """
        cohort_index, plan = planner.next_plan(self._available_cohorts())
        cohort = self.cohorts[cohort_index]
        participants = self.roster.step_participants(among=cohort.sites)
        targets = self._step_targets(cohort, pending)
        start = time.perf_counter()
        data = self._step_data(pending, plan, participants, targets, iteration)
        sent = self._send_tasks(TaskName.STEP, data, fl_ctx)
        return _StepTask(cohort_index, plan, participants, sent, start)

    def _server_step(self, task: _StepTask, replies, iteration: int, first: int, fl_ctx: FLContext):
        """The server's step on the features of ``task`` (decoder, loss, gradients), recorded.

        With ``pipeline_delay`` 1 the step's task went out before the server's step before it: its round trip is
        recorded as the time from that step's end to this one's start, and the site compute as the part of it the
        server waited for, so that the parts of a step add up to its time per iteration; site compute that ran
        during the server's step costs no time and is not counted.

        Returns:
            ``(step, pending)``: the :class:`~splitunet.server.trainer.StepResult`, or ``None`` when every site
            asked to encode dropped out during the step (the others wait for the next one); and the step's
            gradients by site, for the next task each of those sites gets.
        """
        cohort = self.cohorts[task.cohort_index]
        participants = [site for site in task.participants if site in replies]
        if not participants:
            self.log_warning(fl_ctx, f"iteration {iteration}: every site asked to encode dropped out; step skipped")
            return None, {}
        features = self._features(replies, participants, order=cohort.sites)
        site_s = max(float(replies[s].get_meta_prop(MetaKey.SITE_COMPUTE_S, 0.0)) for s in replies)
        round_trip_s = task.round_trip_s
        if task.started < self._last_step_end:
            round_trip_s = time.perf_counter() - self._last_step_end
            site_s = min(site_s, round_trip_s)
        step = self.trainer.train_step(task.plan, features)
        self._last_step_end = time.perf_counter()
        # As received, after every site filter: what the defenses leave on the wire, summed over sites.
        sent = sum(payload_bytes(replies[site]) for site in participants)
        dispatched = [self.last_dispatch_s[site] for site in participants if site in self.last_dispatch_s]
        site_s, server_s, wait_s = self.record.add_step(
            step.loss, site_s, step.compute_s, round_trip_s, sent, dispatched
        )
        self._track(
            fl_ctx, iteration, loss=step.loss, site_compute_s=site_s, server_compute_s=server_s, wait_transfer_s=wait_s
        )
        if iteration % self.settings.log_every == 0 or iteration == first:
            mean = self.record.timing.mean()
            self.log_info(
                fl_ctx,
                f"iteration {iteration}/{self.settings.num_iterations} loss {step.loss:.4f} | mean per step: "
                f"site compute {mean['site_compute']:.3f}s, server compute {mean['server_compute']:.3f}s, "
                f"waiting/transfer {mean['waiting_transfer']:.3f}s",
            )
        return step, {site: grads for site, grads in zip(cohort.sites, step.grads) if grads is not None}

    def _average_encoders(self, pending, iteration: int, fl_ctx: FLContext, abort_signal: Signal) -> dict:
        """Average the encoders of each modality's sites: two round trips of ``split_average``.

        Up: each averaged site's pending gradients (so its encoder is at step ``iteration``), back its encoder's
        weights (a ``WEIGHTS`` DXO through the site's result filters). Down: each modality's average to each of its
        sites (with the job's ``fedprox_mu`` when it is above 0: the average is then each site's FedProx anchor).
        Returns the gradients still pending (those of sites whose modality is not averaged).
        """
        sites = self.averaging.sites_to_average(self.roster.active)
        if not sites:
            return pending
        data = {}
        for site in sites:
            meta = {MetaKey.ITERATION: iteration}
            grads = pending.get(site)
            dxo = control_dxo(meta) if grads is None else features_to_dxo(grads, DataKind.GRADIENTS, meta)
            data[site] = dxo.to_shareable()
        replies = self._round_trip(TaskName.AVERAGE, data, iteration, fl_ctx, abort_signal)
        uploads = {site: dxo_to_encoder(reply, party=site) for site, reply in replies.items()}
        for site, reply in replies.items():
            self.record.note_filters(site, reply.get_meta_prop(MetaKey.FILTER_TRAIL))
        averaged = self.averaging.average(uploads, self.site_modality, iteration)
        down = {}
        for site in uploads:
            meta = {MetaKey.ITERATION: iteration}
            if self.averaging.fedprox_mu > 0:
                # Only then: without FedProx the averaging's messages are what they always were.
                meta[MetaKey.FEDPROX_MU] = self.averaging.fedprox_mu
            down[site] = encoder_to_dxo(averaged[self.site_modality[site]], meta).to_shareable()
        self._round_trip(TaskName.AVERAGE, down, iteration, fl_ctx, abort_signal)
        self.record.encoder_averaging = {
            **self.averaging.describe(),
            "upload_bytes_per_round": sum(weights_bytes(reply) for reply in replies.values()),
        }
        self.log_info(
            fl_ctx,
            f"iteration {iteration}: averaged the encoders of {sorted(uploads)} (round {self.averaging.rounds}); "
            f"distance of each to its average {self.averaging.history[-1]['distance_to_average']}",
        )
        return {site: grads for site, grads in pending.items() if site not in sites}

    def _validate(self, validation: Validation, iteration: int, loss: float, fl_ctx, abort_signal, out_dir) -> bool:
        """Validate and record it; returns whether this is the best validation so far."""
        outcome = validation.run(
            iteration,
            lambda without: self._encode_fn(iteration, fl_ctx, abort_signal, without),
            self.roster,
            final=iteration == self.settings.num_iterations,
            out_dir=out_dir,
            log=lambda message: self.log_info(fl_ctx, message),
        )
        self._track(fl_ctx, iteration, **{f"val_dice_{region}": value for region, value in outcome.dice.items()})
        self._track(fl_ctx, iteration, **{f"val_hd95_{region}": value for region, value in outcome.hd95.items()})
        if outcome.dice_without is not None:
            self.record.dice_without = outcome.dice_without
        if outcome.predictions is not None:
            self.record.predictions = outcome.predictions
            for key in outcome.predictions:
                self.details.write(f"preview predictions/{key}.nii.gz is case {self.trainer.case_name(key)}")
        return self.record.add_validation(iteration, loss, outcome.dice, outcome.hd95)

    def _setup(self, abort_signal: Signal, fl_ctx: FLContext):
        """Sites report modality and keyed cases; the server matches them with its labels."""
        data = {}
        for site in self.sites:
            meta = {MetaKey.CONFIG: self.model_config.to_dict(), MetaKey.EXPERIMENT: self.settings.experiment}
            if site in self.site_saved_iteration:
                meta[MetaKey.RESUME] = {"iteration": self.site_saved_iteration[site]}
            data[site] = control_dxo(meta).to_shareable()
        replies = self._round_trip(TaskName.SETUP, data, 0, fl_ctx, abort_signal)
        site_cases = {}
        for site in self.sites:
            self.site_modality[site] = replies[site].get_meta_prop(MetaKey.MODALITY)
            site_cases[site] = replies[site].get_meta_prop(MetaKey.CASES)
            blocked = replies[site].get_meta_prop(MetaKey.BLOCKED_LEVELS)
            check_sent_levels(site, self.site_modality[site], blocked, self.model_config.skip_levels)
        # A fixed decoder input order, whatever the site names: the order of MODALITIES; within a modality, by name.
        self.groups = modality_groups(self.site_modality)
        self.sites = [site for sites in self.groups.values() for site in sites]

        label_cases = self.trainer.describe_cases()
        server = self.trainer.party
        match = match_cohorts(server, label_cases, site_cases, self.groups)
        for note in cases.training_notes(match.matched, server, match.party_modality):
            self.log_warning(fl_ctx, note)
        for note in cases.training_notes(match.matched, server, match.party_modality, self.trainer.case_name):
            self.details.write(note)
        self.record.left_out_cases = match.matched.left_out
        self.cohorts = match.split(
            label_cases,
            site_cases,
            self.site_modality,
            self.trainer.case_name,
            self.trainer.labels.path,
            self.settings.num_val_cases,
            self.settings.seed,
        )
        self.cohort_of = {key: index for index, cohort in enumerate(self.cohorts) for key in cohort.keys}
        idle = [site for site in self.sites if not any(site in cohort.sites for cohort in self.cohorts)]
        if idle:
            # Only possible with several sites per modality: one site per modality puts every site in the one cohort.
            raise SplitUNetConfigError(
                f"sites {idle} hold no case that a site of every other modality holds too, so they would never train"
            )
        train_keys = sorted(key for cohort in self.cohorts for key in cohort.train_keys)
        val_keys = sorted(key for cohort in self.cohorts for key in cohort.val_keys)
        shapes = {key: tuple(label_cases[key]["shape"]) for key in self.cohort_of}
        self.record.val_cases = list(val_keys)
        self.details.write(
            "validation cases: " + ", ".join(f"{key} is {self.trainer.case_name(key)}" for key in val_keys)
        )
        return train_keys, val_keys, shapes

    def _encode_fn(
        self, iteration: int, fl_ctx: FLContext, abort_signal: Signal, without: str | None = None
    ) -> EncodeFn:
        """Encodes one plan of windows of one case at the active sites of the case's cohort, but those of
        ``without``'s modality: features in decoder order."""

        def encode(plan: dict):
            cohort = self._plan_cohort(plan)
            left_out = self.site_modality[without] if without is not None else None
            active = set(self.roster.active)
            sites = [site for site in cohort.sites if site in active and self.site_modality[site] != left_out]
            replies = self._round_trip(
                TaskName.ENCODE, self._control_data({MetaKey.PLAN: plan}, sites), iteration, fl_ctx, abort_signal
            )
            encoded = [site for site in sites if site in replies]
            if not encoded:
                raise SplitRunError(f"no site is left to encode validation windows at iteration {iteration}")
            return self._features(replies, encoded, order=cohort.sites)

        return encode

    def _plan_cohort(self, plan: Mapping) -> Cohort:
        """The one cohort that holds every case of a plan."""
        found = {self.cohort_of[key] for key in plan["keys"]}
        if len(found) != 1:
            raise SplitRunError(f"a plan of {len(plan['keys'])} windows spans cohorts {sorted(found)}; expected one")
        return self.cohorts[found.pop()]

    def _step_data(self, pending, plan, participants, targets, iteration: int) -> dict[str, Shareable]:
        """Per target site: the gradients of its last features (if any) and the plan to encode (if it takes part)."""
        data = {}
        for site in targets:
            meta = {MetaKey.PLAN: plan if site in participants else None, MetaKey.ITERATION: iteration}
            site_grads = pending.get(site)
            dxo = control_dxo(meta) if site_grads is None else features_to_dxo(site_grads, DataKind.GRADIENTS, meta)
            data[site] = dxo.to_shareable()
        return data

    def _save(self, tag: str, iteration: int, planner, fl_ctx: FLContext, abort_signal: Signal):
        """Sites save first, then the server: its checkpoint is the record that the round of saves completed."""
        meta = {MetaKey.TAG: tag, MetaKey.ITERATION: iteration}
        replies = self._round_trip(TaskName.SAVE, self._control_data(meta), iteration, fl_ctx, abort_signal)
        for site, reply in replies.items():
            self.record.add_checkpoint(tag, reply.get_meta_prop(MetaKey.SAVED_PATH), site=site)
            if tag == "last":
                self.site_saved_iteration[site] = iteration
        path = save_server_state(
            self.checkpoints,
            tag,
            self.trainer,
            planner,
            self.roster,
            self.record,
            iteration=iteration,
            site_modality=self.site_modality,
            site_saved_iteration=self.site_saved_iteration,
            crop_size=self.settings.crop_size,
            averaging=self.averaging,
        )
        self.record.add_checkpoint(tag, str(path))

    def _track(self, fl_ctx: FLContext, step: int, **scalars: float):
        if self.settings.analytics:
            for name, value in scalars.items():
                send_scalar(self, fl_ctx, name, value, step)
