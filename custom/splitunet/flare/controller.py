"""FLARE server workflow of Split-U-Net: adapts :class:`~splitunet.server.trainer.ServerTrainer` to FLARE tasks."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.widgets.streaming import AnalyticsSender

from splitunet.checkpoint import save_checkpoint
from splitunet.compute.devices import select_device
from splitunet.data.case_keys import match_case_keys
from splitunet.data.labels import get_layout, regions_to_labels
from splitunet.data.nifti_io import save_nifti_atomic
from splitunet.data.party_data import LabelFolder
from splitunet.data.party_settings import load_server_settings
from splitunet.data.sampling import RandomCropPlanner
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.flare.site_tasks import SITE_FAILURE_POLICIES, SiteTaskController, SplitRunError
from splitunet.flare.workspace_paths import checkpoint_folder, site_config_dir
from splitunet.resume import decoder_checkpoint, load_for_resume
from splitunet.server.site_roster import SiteRoster
from splitunet.server.trainer import LOSSES, ServerTrainer
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES, DataKind, MetaKey, TaskName, level_key
from splitunet.wire.transport import (
    control_dxo,
    features_to_dxo,
)

__all__ = ["SplitLearningController", "SplitRunError", "SITE_FAILURE_POLICIES", "EXPERIMENT_NAME"]

EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Offsets the modality-dropout generator from the crop sampler's, which uses the seed itself.
_MODALITY_DROPOUT_SEED_OFFSET = 7919


class SplitLearningController(SiteTaskController):
    """Server workflow of Split-U-Net (Roth et al., DeCaF@MICCAI 2022) over FLARE tasks.

    Every iteration sends each site ONE task that carries the gradients of the previous step and the crop plan
    of the next, so a step costs one round trip. Crops are chosen without looking at labels (keys, origins and
    flips are the same at every site, keeping the modalities voxel-aligned). Task data and results pass through
    FLARE's filters in both directions.

    Args:
        num_iterations: training iterations.
        batch_size: crops per iteration.
        crop_size: training crop ``(D, H, W)``; also the sliding-window size at validation.
        features: BasicUNet feature sizes (5 or 6 ints).
        skip_levels: skip levels x0..x3 that sites send (x4 is always sent).
        fusion: ``"concat"`` or ``"mean"``.
        loss: ``"dice_ce"`` or ``"dice_focal"``.
        learning_rate: Adam learning rate at every party.
        weight_decay: Adam weight decay.
        transfer_dtype: ``"float32"`` or ``"float16"`` on the wire.
        val_every: validate every this many iterations (and after the last).
        num_val_cases: held-out cases (chosen by seed among the cases every party has).
        sw_batch_size: windows per round trip at validation.
        sw_overlap: sliding-window overlap.
        num_preview_cases: held-out cases whose final segmentation is written as NIfTI at the server.
        sites: site names to use; default every connected client.
        seed: seed of the case split, crop sampling and initialisation.
        task_timeout: seconds a site may take to answer one task before it counts as gone (see
            ``on_site_failure``).
        setup_timeout: seconds the sites may take to answer the setup task (they may still be starting, and
            they read every case once).
        on_site_failure: ``"stop"``: a site that fails a task or stays silent for ``task_timeout`` stops the
            run, naming the site and iteration; every party keeps its last checkpoint. ``"continue"`` (needs
            ``fusion="mean"``): train and validate on without that modality and log it (``results.json``:
            ``dropped_sites``).
        modality_dropout: probability that a site sits out a training step (at least one site always takes
            part); needs ``fusion="mean"``. Trains the decoder to predict when a modality is absent.
        checkpoint_every: also save the ``last`` checkpoints every this many iterations (0: only when
            validating).
        experiment: name of the checkpoint folder at parties whose settings name a ``checkpoint_dir``.
        resume: continue from every party's ``last`` checkpoint of ``experiment``: model and optimiser states,
            iteration, crop sampler and history. With the same settings the run ends with the same weights as
            one never interrupted.
        task_check_period: how often FLARE checks task status (its 0.2 s default adds latency to every step).
        task_long_poll_s: seconds a site's request for work may wait at the server for its next task (0: FLARE's
            polling only; see :mod:`splitunet.flare.task_long_poll`).
        device: ``"auto"`` or a torch device for the decoder.
        amp: train the decoder under bfloat16 autocast (for GPUs; see :mod:`splitunet.compute.mixed_precision`). Each
            site chooses its own in its executor's ``amp``; the wire precision does not change.
        num_threads: torch CPU threads at the server (0: default or ``$SPLITUNET_TORCH_THREADS``).
        log_every: iterations between log lines with the timing split.
        analytics: stream metrics as FLARE analytics events (a ``TBAnalyticsReceiver`` in the job writes them
            to TensorBoard).
    """

    def __init__(
        self,
        num_iterations: int = 200,
        batch_size: int = 2,
        crop_size: Sequence[int] = (48, 48, 48),
        features: Sequence[int] = (8, 16, 32, 64, 128, 8),
        skip_levels: Sequence[int] = (0, 1, 2, 3),
        fusion: str = "concat",
        loss: str = "dice_ce",
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-5,
        transfer_dtype: str = "float32",
        val_every: int = 100,
        num_val_cases: int = 4,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        num_preview_cases: int = 1,
        sites: Sequence[str] | None = None,
        seed: int = 0,
        task_timeout: int = 600,
        setup_timeout: int = 600,
        on_site_failure: str = "stop",
        modality_dropout: float = 0.0,
        checkpoint_every: int = 0,
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
        super().__init__(task_timeout, setup_timeout, on_site_failure, task_check_period, num_threads, task_long_poll_s)
        self.model_config = SplitModelConfig(
            features=tuple(features),
            skip_levels=tuple(skip_levels),
            fusion=fusion,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            seed=seed,
            transfer_dtype=transfer_dtype,
        )
        positive = {
            "num_iterations": num_iterations,
            "batch_size": batch_size,
            "val_every": val_every,
            "num_val_cases": num_val_cases,
            "sw_batch_size": sw_batch_size,
            "log_every": log_every,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise SplitUNetConfigError(f"{name} must be an int >= 1, got {value!r}")
        # Instance norm at the bottleneck (1/16 resolution) needs more than one voxel.
        if len(crop_size) != 3 or min(crop_size) < 32:
            raise SplitUNetConfigError(f"crop_size must be three ints >= 32, got {crop_size}")
        if loss not in LOSSES:
            raise SplitUNetConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not 0 <= sw_overlap < 1:
            raise SplitUNetConfigError(f"sw_overlap must be in [0, 1), got {sw_overlap}")
        if not 0.0 <= modality_dropout < 1.0:
            raise SplitUNetConfigError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        if fusion != "mean" and (on_site_failure == "continue" or modality_dropout > 0):
            raise SplitUNetConfigError(
                "on_site_failure='continue' and modality_dropout > 0 need fusion='mean' (a concatenating decoder "
                f"cannot run with a modality absent); got fusion={fusion!r}"
            )
        if not isinstance(amp, bool):
            raise SplitUNetConfigError(f"amp must be true or false, got {amp!r}")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise SplitUNetConfigError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
        if not isinstance(experiment, str) or not EXPERIMENT_NAME.match(experiment):
            raise SplitUNetConfigError(
                f"experiment must be 1-64 letters, digits, '_', '.' or '-' (a folder name), got {experiment!r}"
            )
        self.num_iterations = num_iterations
        self.batch_size = batch_size
        self.crop_size = tuple(int(c) for c in crop_size)
        self.loss_name = loss
        self.val_every = val_every
        self.num_val_cases = num_val_cases
        self.sw_batch_size = sw_batch_size
        self.sw_overlap = float(sw_overlap)
        self.num_preview_cases = int(num_preview_cases)
        self.requested_sites = list(sites) if sites else None
        self.seed = int(seed)
        self.modality_dropout = float(modality_dropout)
        self.checkpoint_every = checkpoint_every
        self.experiment = experiment
        self.resume = bool(resume)
        self.device_name = device
        self.amp = amp
        self.log_every = log_every
        self.analytics = bool(analytics)
        self.analytics_sender: AnalyticsSender | None = None
        self.trainer: ServerTrainer | None = None
        self.site_saved_iteration: dict[str, int] = {}
        self.checkpoints: Path | None = None

    # ----------------------------------------------------------------------------------------- FLARE hooks
    def start_controller(self, fl_ctx: FLContext):
        super().start_controller(fl_ctx)
        if self.analytics:
            # Fires FLARE analytics events that any AnalyticsReceiver of the job picks up.
            self.analytics_sender = AnalyticsSender()
            self.analytics_sender.engine = self._engine

    # ----------------------------------------------------------------------------------------- the run
    def _run(self, abort_signal: Signal, fl_ctx: FLContext, out_dir: Path):
        server_party = fl_ctx.get_identity_name()
        settings = load_server_settings(server_party, site_config_dir(fl_ctx))
        if settings.labels_dir is None:
            raise SplitUNetConfigError(f"{settings.source}: the server's entry needs 'labels_dir' to train")
        labels = LabelFolder(settings.labels_dir, settings.layout, party=server_party)
        self.layout = get_layout(settings.layout)
        device = select_device(self.device_name)
        self.trainer = ServerTrainer(labels, settings.case_key_secret, device, self.loss_name, amp=self.amp)
        if self.amp and not self.trainer.amp:
            self.log_warning(fl_ctx, f"amp ignored on {device} (AMP is for CUDA): the decoder trains in float32")
        self.checkpoints = checkpoint_folder(fl_ctx, settings.checkpoint_dir, self.experiment)
        self.sites = self.requested_sites or sorted(client.name for client in self._engine.get_clients())
        if not self.sites:
            raise SplitRunError("no sites are connected")
        saved = None
        if self.resume:
            path = decoder_checkpoint(self.checkpoints, "last")
            saved = load_for_resume(path, server_party, None, self.model_config.to_dict())
            self.results["resumed_from"] = {"iteration": int(saved["iteration"]), "checkpoint": str(path)}
            self.site_saved_iteration = dict(saved["site_saved_iteration"])

        train_keys, val_keys, shapes = self._setup(abort_signal, fl_ctx)
        self.trainer.build(self.model_config, num_sites=len(self.sites))
        planner = RandomCropPlanner(
            {key: shapes[key] for key in train_keys}, self.crop_size, self.batch_size, seed=self.seed
        )
        self.roster = SiteRoster(
            self.sites, self.site_modality, self.modality_dropout, seed=self.seed + _MODALITY_DROPOUT_SEED_OFFSET
        )
        self.results.update(
            sites={site: self.site_modality[site] for site in self.sites},
            num_train_cases=len(train_keys),
            num_val_cases=len(val_keys),
            model=self.model_config.to_dict(),
            crop_size=list(self.crop_size),
            batch_size=self.batch_size,
            server_compute={"device": str(self.trainer.device), "amp": self.trainer.amp, "amp_requested": self.amp},
            history=[],
            loss_curve=[],
            dropped_sites=[],
            checkpoints={"server": {}, "sites": {}},
        )
        first = 1
        if saved is not None:
            first = self._restore(saved, planner, fl_ctx) + 1
        self.log_info(
            fl_ctx,
            f"training iterations {first}..{self.num_iterations} on {len(train_keys)} cases, validating on "
            f"{len(val_keys)}; sites in decoder order: {[(s, self.site_modality[s]) for s in self.sites]}",
        )
        grads, loss = None, float("nan")
        self._timing_sum, self._steps_timed = np.zeros(3), 0
        self._dispatch: list[tuple[float, float]] = []
        for iteration in range(first, self.num_iterations + 1):
            if abort_signal.triggered:
                return
            step = self._train_iteration(planner.next_plan(), grads, iteration, first, fl_ctx, abort_signal)
            grads = step.grads if step else None
            loss = step.loss if step else loss
            self.results["iterations"] = iteration
            validate = iteration % self.val_every == 0 or iteration == self.num_iterations
            if validate or (self.checkpoint_every and iteration % self.checkpoint_every == 0):
                # Deliver the pending gradients first so that every encoder is at step `iteration`.
                self._round_trip(
                    TaskName.STEP, self._step_data(grads, None, (), iteration), iteration, fl_ctx, abort_signal
                )
                grads = None
                self._checkpoint_round(
                    iteration, validate, loss, val_keys, shapes, planner, fl_ctx, abort_signal, out_dir
                )
        mean = self._timing_sum / max(self._steps_timed, 1)
        # As received, after every site filter: what the defenses leave on the wire, summed over sites.
        self.results["activation_bytes_per_iteration"] = self._activation_bytes / max(self._steps_timed, 1)
        self.results["timing_per_iteration_s"] = {
            "site_compute": float(mean[0]),
            "server_compute": float(mean[1]),
            "waiting_transfer": float(mean[2]),
        }
        # Part of waiting/transfer: the spread with which FLARE hands the step's tasks to the sites.
        if self._dispatch:
            first_site, last_site = np.mean(self._dispatch, axis=0)
            self.results["task_dispatch_per_iteration_s"] = {
                "first_site": float(first_site),
                "last_site": float(last_site),
            }

    def _train_iteration(self, plan, grads, iteration: int, first: int, fl_ctx: FLContext, abort_signal: Signal):
        """One round trip (gradients of the last step out, features of this one back) and the server's step.

        Returns:
            the :class:`~splitunet.server.trainer.StepResult`, or ``None`` when every site asked to encode
            dropped out during the step (the others wait for the next one).
        """
        participants = self.roster.step_participants()
        start = time.perf_counter()
        replies = self._round_trip(
            TaskName.STEP, self._step_data(grads, plan, participants, iteration), iteration, fl_ctx, abort_signal
        )
        round_trip_s = time.perf_counter() - start
        participants = [site for site in participants if site in replies]
        if not participants:
            self.log_warning(fl_ctx, f"iteration {iteration}: every site asked to encode dropped out; step skipped")
            return None
        features = self._features(replies, participants, training=True)
        site_s = max(float(replies[s].get_meta_prop(MetaKey.SITE_COMPUTE_S, 0.0)) for s in replies)
        step = self.trainer.train_step(plan, features)
        timing = np.array([site_s, step.compute_s, max(round_trip_s - site_s, 0.0)])
        self._timing_sum += timing
        self._steps_timed += 1
        dispatched = [self.last_dispatch_s[site] for site in participants if site in self.last_dispatch_s]
        if dispatched:
            self._dispatch.append((min(dispatched), max(dispatched)))
        self.results["loss_curve"].append(step.loss)
        self._track(
            iteration, loss=step.loss, site_compute_s=timing[0], server_compute_s=timing[1], wait_transfer_s=timing[2]
        )
        if iteration % self.log_every == 0 or iteration == first:
            mean = self._timing_sum / self._steps_timed
            self.log_info(
                fl_ctx,
                f"iteration {iteration}/{self.num_iterations} loss {step.loss:.4f} | mean per step: "
                f"site compute {mean[0]:.3f}s, server compute {mean[1]:.3f}s, waiting/transfer {mean[2]:.3f}s",
            )
        return step

    def _checkpoint_round(
        self, iteration, validate: bool, loss: float, val_keys, shapes, planner, fl_ctx, abort_signal, out_dir
    ):
        """Validate (if due), then save ``last`` (and ``best`` when validation improved) at every party."""
        is_best = False
        if validate:
            final = iteration == self.num_iterations
            dice = self._validate(val_keys, shapes, iteration, fl_ctx, abort_signal, out_dir, final)
            self.results["history"].append({"iteration": iteration, "loss": loss, "dice": dice})
            self.results["dice"] = dice
            is_best = dice["mean"] > self.results.get("best", {}).get("dice", {}).get("mean", -1.0)
            if is_best:
                self.results["best"] = {"iteration": iteration, "dice": dice}
        self._save("last", iteration, planner, fl_ctx, abort_signal, out_dir)
        if is_best:
            self._save("best", iteration, planner, fl_ctx, abort_signal, out_dir)

    def _restore(self, saved: dict, planner: RandomCropPlanner, fl_ctx: FLContext) -> int:
        """Take up the server's ``last`` checkpoint; returns the iteration it was written at."""
        if saved["site_modality"] != {site: self.site_modality[site] for site in self.sites}:
            raise SplitUNetConfigError(
                f"cannot resume: the checkpoint was written with sites {saved['site_modality']}, this run has "
                f"{ {site: self.site_modality[site] for site in self.sites} }"
            )
        self.trainer.load_state_dict(saved)
        planner.load_state_dict(saved["planner"])
        self.roster.load_state_dict(saved["roster"])
        for key in ("history", "loss_curve", "best", "dice", "dropped_sites"):
            if key in saved["results"]:
                self.results[key] = saved["results"][key]
        iteration = int(saved["iteration"])
        self.results["iterations"] = iteration
        self.log_info(fl_ctx, f"resumed from iteration {iteration} ({self.results['resumed_from']['checkpoint']})")
        return iteration

    def _setup(self, abort_signal: Signal, fl_ctx: FLContext):
        """Sites report modality and keyed cases; the server matches them with its labels."""
        data = {}
        for site in self.sites:
            meta = {MetaKey.CONFIG: self.model_config.to_dict(), MetaKey.EXPERIMENT: self.experiment}
            if site in self.site_saved_iteration:
                meta[MetaKey.RESUME] = {"iteration": self.site_saved_iteration[site]}
            data[site] = control_dxo(meta).to_shareable()
        replies = self._round_trip(TaskName.SETUP, data, 0, fl_ctx, abort_signal)
        cases_by_party = {}
        for site in self.sites:
            self.site_modality[site] = replies[site].get_meta_prop(MetaKey.MODALITY)
            cases_by_party[site] = replies[site].get_meta_prop(MetaKey.CASES)
            blocked = set(replies[site].get_meta_prop(MetaKey.BLOCKED_LEVELS) or ()) & set(
                self.model_config.skip_levels
            )
            if blocked:
                raise SplitUNetConfigError(
                    f"site {site} ({self.site_modality[site]}) never sends skip level(s) "
                    f"{[level_key(v) for v in sorted(blocked)]} (BlockSkipLevels in its privacy policy or the job), "
                    f"but the decoder expects skip_levels {list(self.model_config.skip_levels)}; configure the job "
                    f"with skip_levels {sorted(set(self.model_config.skip_levels) - blocked)}"
                )
        by_modality = {}
        for site, modality in self.site_modality.items():
            if modality in by_modality:
                raise SplitUNetConfigError(f"sites {by_modality[modality]} and {site} both hold modality {modality}")
            by_modality[modality] = site
        # A fixed decoder input order, whatever the site names: the order of MODALITIES.
        self.sites.sort(key=lambda site: MODALITIES.index(self.site_modality[site]))

        label_cases = self.trainer.describe_cases()
        server = self.trainer.party
        match = match_case_keys({server: label_cases.keys(), **{s: c.keys() for s, c in cases_by_party.items()}})
        for party, missing in match.missing.items():
            for key in missing:
                name = self.trainer.case_name(key)
                where = "has no label" if party == server else f"is missing at {party} ({self.site_modality[party]})"
                self.log_warning(fl_ctx, f"case {name} (key {key[:8]}) {where}; left out of training")
        self.results["left_out_cases"] = {party: len(keys) for party, keys in match.missing.items() if keys}
        if len(match.common) < 2:
            raise SplitUNetConfigError(f"only {len(match.common)} cases are present at every party; need at least 2")
        for key in match.common:
            for site in self.sites:
                if cases_by_party[site][key]["affine_digest"] != label_cases[key]["affine_digest"]:
                    raise SplitUNetDataError(
                        f"{self.site_modality[site]} volume (shape {cases_by_party[site][key]['shape']}) is not "
                        f"voxel-aligned with the label (shape {label_cases[key]['shape']}): shape or affine differs",
                        party=site,
                        case=self.trainer.case_name(key),
                        file=self.trainer.labels.path(self.trainer.case_name(key)),
                    )
        rng = np.random.default_rng(self.seed)
        order = [match.common[i] for i in rng.permutation(len(match.common))]
        num_val = min(self.num_val_cases, len(order) - 1)
        val_keys, train_keys = sorted(order[:num_val]), sorted(order[num_val:])
        shapes = {key: tuple(label_cases[key]["shape"]) for key in match.common}
        self.results["val_cases"] = [self.trainer.case_name(key) for key in val_keys]
        return train_keys, val_keys, shapes

    def _step_data(self, grads, plan, participants, iteration: int) -> dict[str, Shareable]:
        """Per active site: the gradients of its last features (if any) and the plan to encode (if it takes part)."""
        grads_of = dict(zip(self.sites, grads)) if grads is not None else {}
        data = {}
        for site in self.roster.active:
            meta = {MetaKey.PLAN: plan if site in participants else None, MetaKey.ITERATION: iteration}
            site_grads = grads_of.get(site)
            dxo = control_dxo(meta) if site_grads is None else features_to_dxo(site_grads, DataKind.GRADIENTS, meta)
            data[site] = dxo.to_shareable()
        return data

    def _encode_fn(self, iteration: int, fl_ctx: FLContext, abort_signal: Signal, without: str | None = None):
        def encode(plan: dict):
            sites = [site for site in self.roster.active if site != without]
            replies = self._round_trip(
                TaskName.ENCODE, self._control_data({MetaKey.PLAN: plan}, sites), iteration, fl_ctx, abort_signal
            )
            encoded = [site for site in sites if site in replies]
            if not encoded:
                raise SplitRunError(f"no site is left to encode validation windows at iteration {iteration}")
            return self._features(replies, encoded)

        return encode

    def _validate(self, val_keys, shapes, iteration, fl_ctx, abort_signal, out_dir: Path, final: bool) -> dict:
        start = time.perf_counter()
        keep = val_keys[: self.num_preview_cases] if final else ()
        dice, kept = self.trainer.validate(
            val_keys,
            shapes,
            self._encode_fn(iteration, fl_ctx, abort_signal),
            self.crop_size,
            self.sw_batch_size,
            self.sw_overlap,
            keep=keep,
        )
        self.log_info(
            fl_ctx,
            f"validation at iteration {iteration}: Dice TC {dice['TC']:.3f} WT {dice['WT']:.3f} ET {dice['ET']:.3f} "
            f"(mean {dice['mean']:.3f}) on {len(val_keys)} held-out cases in {time.perf_counter() - start:.1f}s",
        )
        self._track(iteration, **{f"val_dice_{region}": value for region, value in dice.items()})
        if final and self.model_config.fusion == "mean" and len(self.roster.active) > 1:
            self.results["dice_without"] = self._validate_without_each(
                val_keys, shapes, iteration, fl_ctx, abort_signal
            )
        if kept:
            previews = {}
            for key, probabilities in kept.items():
                case = self.trainer.case_name(key)
                _, affine = self.trainer.labels.read(case)
                segmentation = regions_to_labels(probabilities.numpy(), self.layout)
                path = out_dir / "predictions" / f"{case}.nii.gz"
                save_nifti_atomic(segmentation.astype(np.uint8), affine, path)
                previews[case] = str(path)
            self.results["predictions"] = previews
        return dice

    def _validate_without_each(self, val_keys, shapes, iteration, fl_ctx, abort_signal) -> dict[str, dict]:
        """Dice with each active modality left out in turn: what the model is worth when that site is absent."""
        dice_without = {}
        for site in list(self.roster.active):
            dice, _ = self.trainer.validate(
                val_keys,
                shapes,
                self._encode_fn(iteration, fl_ctx, abort_signal, without=site),
                self.crop_size,
                self.sw_batch_size,
                self.sw_overlap,
            )
            modality = self.site_modality[site]
            dice_without[modality] = dice
            self.log_info(
                fl_ctx,
                f"validation at iteration {iteration} without {modality} ({site}): Dice TC {dice['TC']:.3f} "
                f"WT {dice['WT']:.3f} ET {dice['ET']:.3f} (mean {dice['mean']:.3f})",
            )
        return dice_without

    def _save(self, tag: str, iteration: int, planner, fl_ctx: FLContext, abort_signal: Signal, out_dir: Path):
        """Sites save first, then the server: its checkpoint is the record that the round of saves completed."""
        replies = self._round_trip(
            TaskName.SAVE,
            self._control_data({MetaKey.TAG: tag, MetaKey.ITERATION: iteration}),
            iteration,
            fl_ctx,
            abort_signal,
        )
        for site, reply in replies.items():
            self.results["checkpoints"]["sites"].setdefault(site, {})[tag] = reply.get_meta_prop(MetaKey.SAVED_PATH)
            if tag == "last":
                self.site_saved_iteration[site] = iteration
        state = self.trainer.state_dict()
        state.update(
            iteration=iteration,
            sites=self.sites,
            site_modality=self.site_modality,
            site_saved_iteration=self.site_saved_iteration,
            crop_size=list(self.crop_size),
            planner=planner.state_dict(),
            roster=self.roster.state_dict(),
            results={
                key: self.results[key]
                for key in ("history", "loss_curve", "best", "dice", "dropped_sites")
                if key in self.results
            },
        )
        path = save_checkpoint(state, decoder_checkpoint(self.checkpoints, tag))
        self.results["checkpoints"]["server"][tag] = str(path)

    def _track(self, step: int, **scalars: float):
        if self.analytics_sender is None:
            return
        for name, value in scalars.items():
            self.analytics_sender.add(name, float(value), AnalyticsDataType.SCALAR, global_step=step)
