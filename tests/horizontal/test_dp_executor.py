"""horizontal.executor with DP-SGD: at its first train task a hospital projects the job's epsilon over the announced
rounds, refuses the job when its own max_epsilon is lower (every later task too) or when the job has no DP-SGD, and
otherwise reports the epsilon spent, not the loss, with its weights."""

from __future__ import annotations

import json

import pytest
from fakes import WorkspaceEngine
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from splitunet.horizontal import FedAvgHospitalExecutor, FedAvgUNet
from splitunet.horizontal.executor import RESULTS_FILE, TRAIN_TASK, VALIDATE_TASK

FEATURES = [4, 8, 8, 16, 16, 4]
ROUNDS = 3
ARGS = {
    "local_iterations": 1,
    "features": FEATURES,
    "crop_size": [32, 32, 32],
    "num_val_cases": 1,
    "seed": 4,
    "dp": {"noise_multiplier": 1.0, "max_grad_norm": 0.25},
}


def _context(tmp_path, hospital_dir, cap: dict | None) -> FLContext:
    root = tmp_path / "workspace"
    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True)
    settings = {"parties": {"hospital-a": {"hospital_dir": str(hospital_dir), "layout": "msd"}}}
    (root / "local" / "splitunet_site.json").write_text(json.dumps(settings))
    if cap is not None:
        (root / "local" / "privacy.json").write_text(json.dumps({"scopes": [], "splitunet_epsilon_cap": cap}))
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, WorkspaceEngine(Workspace(str(root), "hospital-a")), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "hospital-a", private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    return fl_ctx


def _train_task(round_number: int = 0, total_rounds: int = ROUNDS) -> Shareable:
    weights = {name: t.numpy() for name, t in FedAvgUNet(FEATURES, seed=0).state_dict().items()}
    model = FLModel(ParamsType.FULL, weights, current_round=round_number, total_rounds=total_rounds)
    return FLModelUtils.to_shareable(model)


def _run(executor, task, shareable, fl_ctx) -> Shareable:
    return executor.execute(task, shareable, fl_ctx, Signal())


@pytest.fixture(scope="module")
def hospital_dir(tiny_parties):
    return tiny_parties.parent / "msd"


def test_a_job_within_the_cap_trains_and_reports_its_epsilon_not_its_loss(tmp_path, hospital_dir):
    fl_ctx = _context(tmp_path, hospital_dir, {"max_epsilon": 50.0})
    executor = FedAvgHospitalExecutor(**ARGS)
    reply = _run(executor, TRAIN_TASK, _train_task(), fl_ctx)
    assert reply.get_return_code() == ReturnCode.OK
    metrics = FLModelUtils.from_shareable(reply).metrics
    budget = executor.trainer.budget
    assert budget.steps == ROUNDS * ARGS["local_iterations"]
    assert set(metrics) == {"iterations", "dp_epsilon", "dp_delta"}
    assert metrics["dp_epsilon"] == pytest.approx(budget.epsilon_at(budget.delta, steps=1), rel=1e-12)
    results = json.loads((tmp_path / "workspace" / "job-1" / RESULTS_FILE).read_text())
    assert results["dp"]["epsilon_per_round"] == [metrics["dp_epsilon"]]
    assert results["dp"]["budget"]["epsilon"] == budget.epsilon < 50.0
    assert results["dp"]["site_cap"] == {"max_epsilon": 50.0, "delta": None}
    # A workflow that now announces more rounds than the hospital admitted is refused.
    more = _run(executor, TRAIN_TASK, _train_task(round_number=1, total_rounds=9), fl_ctx)
    assert more.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and executor.trainer.private.steps_taken == 1


def test_a_job_above_the_cap_is_refused_before_any_step_and_stays_refused(tmp_path, hospital_dir, caplog):
    fl_ctx = _context(tmp_path, hospital_dir, {"max_epsilon": 1.0})
    executor = FedAvgHospitalExecutor(**ARGS)
    reply = _run(executor, TRAIN_TASK, _train_task(), fl_ctx)
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert executor.trainer.private.steps_taken == 0
    refusal = str(executor.refusal)
    assert "site hospital-a refuses this job: its projected epsilon" in refusal
    assert f"{executor.trainer.budget.epsilon:.4g} at delta 1e-05" in refusal and "cap max_epsilon 1 " in refusal
    # The refusal is logged as an error (provisioned sites stream those to the server): it names no case or path.
    assert any(refusal in record.getMessage() for record in caplog.records if record.levelname == "ERROR")
    assert str(hospital_dir) not in refusal
    validate = Shareable()
    assert _run(executor, VALIDATE_TASK, validate, fl_ctx).get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def test_a_site_with_a_cap_refuses_a_job_without_dp(tmp_path, hospital_dir):
    fl_ctx = _context(tmp_path, hospital_dir, {"max_epsilon": 8})
    executor = FedAvgHospitalExecutor(**{**ARGS, "dp": None})
    assert _run(executor, TRAIN_TASK, _train_task(), fl_ctx).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "trains without DP-SGD" in str(executor.refusal) and executor.results["rounds"] == 0


def test_a_malformed_dp_argument_is_named_when_flare_builds_the_executor():
    from splitunet.errors import SplitUNetConfigError

    with pytest.raises(SplitUNetConfigError, match="dp: accountant must be one of"):
        FedAvgHospitalExecutor(**{**ARGS, "dp": {"noise_multiplier": 1.0, "accountant": "moments"}})


def test_a_hospital_without_opacus_refuses_a_dp_job_when_flare_builds_it(monkeypatch):
    from splitunet.errors import SplitUNetConfigError
    from splitunet.horizontal import executor as module

    monkeypatch.setattr(module, "_installed", lambda package: package != "opacus")
    with pytest.raises(SplitUNetConfigError, match=r"needs Opacus: pip install 'splitunet\[dp\]'"):
        FedAvgHospitalExecutor(**ARGS)
    FedAvgHospitalExecutor(**{**ARGS, "dp": None})  # the plain FedAvg job needs no Opacus
