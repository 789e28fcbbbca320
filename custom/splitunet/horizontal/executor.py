"""FLARE executor of a hospital in the horizontal FedAvg baseline: adapts :class:`LocalTrainer` to FLARE's tasks.

It answers the tasks of FLARE's own workflows: ``train`` from :class:`nvflare.app_common.workflows.fedavg.FedAvg`
(an ``FLModel`` with the global weights, the round and, when the job sets ``fedprox_mu``, FedProx's coefficient in
its metadata) and ``validate`` from :class:`nvflare.app_common.workflows.global_model_eval.GlobalModelEval` (the
persisted final global model, as a weights DXO). Weights travel as float32 NumPy arrays, the form FLARE's PT
persistor hands out and takes back.

Each hospital keeps what it learned about its own run in ``results.json`` in its run folder (rounds, loss per
round, Dice of the global model on its held-out cases); the server's ``cross_site_val/cross_val_results.json``
collects every hospital's Dice of the final global model.

With DP-SGD (the executor's ``dp`` argument, :mod:`splitunet.dp`) the hospital fixes its budget at the first ``train``
task, from the job's DP settings and its step budget (the workflow's announced rounds times ``local_iterations``),
checks it against its own ``max_epsilon`` (``local/privacy.json``, :mod:`splitunet.dp.site_cap`; a hospital with a cap
refuses any job without DP-SGD too), and then reports the epsilon spent after every round in its reply's metrics, its
log and ``results.json`` (``dp``); its losses then stay home.
"""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from splitunet.atomic_files import write_json_atomic
from splitunet.compute.devices import configure_threads
from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.hospital_settings import load_hospital_settings
from splitunet.dp.site_cap import EpsilonCapExceeded, check_epsilon_cap, read_epsilon_cap
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.flare.nvflare_compat import send_scalar
from splitunet.flare.site_minimum import PRIVACY_FILE
from splitunet.flare.workspace_paths import run_dir, site_config_dir
from splitunet.horizontal.local_trainer import LocalSettings, LocalTrainer

__all__ = ["FedAvgHospitalExecutor", "RESULTS_FILE", "TRAIN_TASK", "VALIDATE_TASK"]

TRAIN_TASK = AppConstants.TASK_TRAIN
VALIDATE_TASK = AppConstants.TASK_VALIDATION
RESULTS_FILE = "results.json"


class FedAvgHospitalExecutor(Executor):
    """Runs one hospital of the FedAvg baseline.

    The hospital reads its dataset folder from its own settings (``hospital_dir`` in ``local/splitunet_site.json``
    or ``$SPLITUNET_SITE_CONFIG``, see :mod:`splitunet.data.hospital_settings`). Images and labels never leave it:
    replies carry weights and metrics only, and a failure reply carries no message (the details stay in the
    hospital's log).

    Args:
        local_iterations: Adam steps per round.
        val_every: also score the received global model on the held-out cases every this many rounds (0: only
            the final model, by the ``validate`` task).
        device: ``"auto"`` (CUDA if this hospital has a GPU, else CPU) or a torch device name.
        num_threads: torch CPU threads; 0 keeps torch's default (or ``$SPLITUNET_TORCH_THREADS``).
        max_cached_cases: how many read cases to keep in memory (``None``: all).
        **settings: :class:`~splitunet.horizontal.local_trainer.LocalSettings` (model, crops, loss, optimiser,
            validation, seed, and ``dp``: the DP-SGD settings of :class:`~splitunet.dp.DPSettings`).

    Raises:
        SplitUNetConfigError: a malformed argument, when FLARE builds the executor (the message names it).
    """

    def __init__(
        self,
        local_iterations: int = 10,
        val_every: int = 0,
        device: str = "auto",
        num_threads: int = 0,
        max_cached_cases: int | None = None,
        **settings,
    ):
        super().__init__()
        for name, value in (("local_iterations", local_iterations), ("val_every", val_every)):
            minimum = 1 if name == "local_iterations" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise SplitUNetConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
        for name, value in (("num_threads", num_threads), ("max_cached_cases", max_cached_cases)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SplitUNetConfigError(f"{name} must be an int >= 0, got {value!r}")
        try:
            self.settings = LocalSettings(**settings)
        except TypeError as error:
            raise SplitUNetConfigError(f"unknown hospital executor argument: {error}") from None
        if self.settings.dp is not None and not _installed("opacus"):
            # Said when FLARE builds the job, not at the first round.
            raise SplitUNetConfigError("this job trains with DP-SGD, which needs Opacus: pip install 'splitunet[dp]'")
        self.local_iterations = local_iterations
        self.val_every = val_every
        self.device_name = device
        self.num_threads = num_threads
        self.max_cached_cases = max_cached_cases
        self.trainer: LocalTrainer | None = None
        self.results: dict = {}
        self.results_path: Path | None = None
        # The job's step budget as the workflow announced it at the first train task (rounds), once admitted.
        self.admitted_rounds: int | None = None
        # Why this hospital refused the job (its epsilon cap): every later task is refused the same way.
        self.refusal: EpsilonCapExceeded | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            configure_threads(self.num_threads)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        party = fl_ctx.get_identity_name()
        handlers = {TRAIN_TASK: self._train, VALIDATE_TASK: self._validate}
        handler = handlers.get(task_name)
        if handler is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        try:
            if self.refusal is not None:
                raise self.refusal
            if self.trainer is None:
                self._setup(party, fl_ctx)
            return handler(shareable, party, fl_ctx, abort_signal)
        except EpsilonCapExceeded as error:
            # The refusal names the cap and the projected epsilon only, no case or path: the submitter may read it.
            self.refusal = error
            self.log_error(fl_ctx, f"task {task_name} refused: {error}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        except Exception as error:  # noqa: BLE001 - the hospital's log must say why; the server only that it failed
            full = f"{type(error).__name__}: {error}"
            if not isinstance(error, (SplitUNetDataError, SplitUNetConfigError, ValueError, RuntimeError)):
                full += "\n" + traceback.format_exc()
            # The full message names cases and files: a warning without a log event, because provisioned FLARE
            # sites stream their error log to the server (as the split site executor does).
            self.log_warning(fl_ctx, f"task {task_name} failed: {party}: {full}", fire_event=False)
            self.log_error(fl_ctx, f"task {task_name} failed: {party}: {type(error).__name__}; details in its log")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _setup(self, party: str, fl_ctx: FLContext) -> None:
        settings = load_hospital_settings(party, site_config_dir(fl_ctx))
        data = HospitalFolder(settings.data_dir, settings.layout, party=party, max_cached=self.max_cached_cases)
        self.trainer = LocalTrainer(data, self.settings, self.device_name)
        self.results_path = run_dir(fl_ctx) / RESULTS_FILE
        self.results = {
            "party": party,
            "rounds": 0,
            "iterations": 0,
            "local_iterations": self.local_iterations,
            "train_cases": len(self.trainer.train_cases),
            "val_cases": len(self.trainer.val_cases),
            "fedprox_mu": 0.0,
            "loss_curve": [],
            "history": [],
            "dice": None,
            "hd95": None,
            "dp": None,
        }
        self.log_info(
            fl_ctx,
            f"{party}: {len(data.case_ids)} cases from {settings.data_dir} (layout {settings.layout}, settings "
            f"{settings.source}): {self.results['train_cases']} to train on, {self.results['val_cases']} held out; "
            f"device {self.trainer.device}",
        )

    def _admit(self, party: str, total_rounds: int, fl_ctx: FLContext) -> None:
        """Fix the DP-SGD budget for the announced rounds and check it against the site's epsilon cap, before the
        first step; later rounds must announce the same total."""
        if self.admitted_rounds is not None:
            if total_rounds != self.admitted_rounds:
                raise SplitUNetConfigError(
                    f"{party}: the workflow announced {self.admitted_rounds} rounds when this hospital admitted the "
                    f"job, and now {total_rounds}; refused (its epsilon was projected for the first)"
                )
            return
        if isinstance(total_rounds, bool) or not isinstance(total_rounds, int) or total_rounds < 1:
            raise SplitUNetConfigError(f"{party}: the train task announces no number of rounds ({total_rounds!r})")
        budget = None
        if self.settings.dp is not None:
            budget = self.trainer.plan_privacy(total_rounds * self.local_iterations)
        cap = read_epsilon_cap(site_config_dir(fl_ctx) / PRIVACY_FILE)
        checked = check_epsilon_cap(cap, budget, party)
        self.admitted_rounds = total_rounds
        if budget is not None:
            self.results["dp"] = {
                "settings": self.settings.dp.as_dict(),
                "budget": budget.as_dict(),
                "model_changes": self.trainer.dp_changes.as_dict(),
                "site_cap": None if cap is None else {"max_epsilon": cap.max_epsilon, "delta": cap.delta},
                "epsilon": 0.0,
                "delta": budget.delta,
                "epsilon_per_round": [],
            }
            self.log_info(
                fl_ctx,
                f"{party}: DP-SGD over {budget.steps} steps (sigma {budget.noise_multiplier:.4g}, C "
                f"{budget.max_grad_norm:g}, sample rate {budget.sample_rate:.4g}, "
                f"{'Poisson' if budget.poisson_sampling else 'shuffled fixed-size (epsilon approximate)'} batches, "
                f"{budget.accountant} accountant): projected epsilon {budget.epsilon:.4g} at delta {budget.delta:g}; "
                f"model: {self.trainer.dp_changes.summary()}",
            )
        if checked:
            self.log_info(fl_ctx, f"{party}: {checked}")

    def _write_results(self) -> None:
        write_json_atomic(self.results, self.results_path)

    def _train(self, shareable: Shareable, party: str, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        model = FLModelUtils.from_shareable(shareable)
        if model.params_type != ParamsType.FULL or not model.params:
            raise ValueError(f"{party}: the train task carries no full global model (params type {model.params_type})")
        round_number = int(model.current_round or 0)
        mu = float((model.meta or {}).get(AlgorithmConstants.FEDPROX_MU) or 0.0)
        self._admit(party, model.total_rounds, fl_ctx)
        if self.val_every and round_number and round_number % self.val_every == 0:
            # The model received at round r is the average after r rounds.
            dice, hd95 = self.trainer.score(model.params)
            self.results["history"].append(
                {"round": round_number, "iterations": round_number * self.local_iterations, "dice": dice, "hd95": hd95}
            )
            self.log_info(fl_ctx, f"{party}: global model after {round_number} rounds: {_dice_line(dice)}")
        local = self.trainer.train_round(model.params, self.local_iterations, mu)
        self.results.update(
            rounds=round_number + 1, iterations=(round_number + 1) * self.local_iterations, fedprox_mu=mu
        )
        self.results["loss_curve"].append(local.metrics["loss"])
        privacy = ""
        if "dp_epsilon" in local.metrics:
            epsilon, delta = local.metrics["dp_epsilon"], local.metrics["dp_delta"]
            self.results["dp"]["epsilon"] = epsilon
            self.results["dp"]["epsilon_per_round"].append(epsilon)
            # To the server's TensorBoard (the DP job forwards the hospitals' analytics).
            send_scalar(self, fl_ctx, "dp_epsilon", epsilon, round_number + 1)
            privacy = f", DP-SGD epsilon {epsilon:.4g} at delta {delta:g} spent so far"
        self._write_results()
        self.log_info(
            fl_ctx,
            f"{party}: round {round_number + 1}/{model.total_rounds}: {self.local_iterations} iterations, "
            f"loss {local.metrics['first_loss']:.4f} -> {local.metrics['last_loss']:.4f}"
            + (f", FedProx mu {mu}" if mu else "")
            + privacy,
        )
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        reply = FLModel(
            params_type=ParamsType.FULL,
            params=local.weights,
            metrics=local.shared_metrics(),
            current_round=round_number,
            # FedAvg weighs each result by this entry: the hospital's training cases, FedAvg's n_k.
            meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: local.num_cases},
        )
        return FLModelUtils.to_shareable(reply)

    def _validate(self, shareable: Shareable, party: str, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
            raise ValueError(f"{party}: the validate task carries no model weights (data kind {dxo.data_kind})")
        model_name = shareable.get_header(AppConstants.MODEL_OWNER, "the global model")
        dice, hd95 = self.trainer.score(dxo.data)
        self.results["dice"], self.results["hd95"] = dice, hd95
        self.results["validated_model"] = model_name
        self._write_results()
        self.log_info(
            fl_ctx,
            f"{party}: {model_name} on {len(self.trainer.val_cases)} held-out cases: {_dice_line(dice)}, HD95 TC "
            f"{hd95['TC']:.1f} WT {hd95['WT']:.1f} ET {hd95['ET']:.1f} voxels",
        )
        metrics = {**dice, **{f"hd95_{region}": value for region, value in hd95.items()}}
        return DXO(DataKind.METRICS, data={**metrics, "val_cases": len(self.trainer.val_cases)}).to_shareable()


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:  # a finder that refuses the name
        return False


def _dice_line(dice: dict) -> str:
    return f"Dice TC {dice['TC']:.3f} WT {dice['WT']:.3f} ET {dice['ET']:.3f} (mean {dice['mean']:.3f})"
