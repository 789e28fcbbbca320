"""u_shape hospital with DP-SGD: one step of head and tail is the sum of each case's own gradient (the tail's from the
local loss, the head's through the server's dL/dx0), clipped to C over both parts together (a case repeated in the
batch counts once) and noised; it runs in-process with the shared middle and the averaging; and the executor refuses,
before its setup reply leaves, a job above the hospital's epsilon cap or without DP-SGD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fakes import WorkspaceEngine
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace

from splitunet.data.hospital_folder import HospitalFolder
from splitunet.data.sampling import extract_crop
from splitunet.dp import DPSettings, prepare_for_dp
from splitunet.flare.replies import reply_error_message
from splitunet.server.trainer import make_loss
from splitunet.u_shape import in_process
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.executor import UShapeHospitalExecutor
from splitunet.u_shape.hospital_trainer import HospitalTrainer
from splitunet.u_shape.networks import seeded_part
from splitunet.u_shape.protocol import UMetaKey, UTaskName
from splitunet.u_shape.server_trainer import MiddleTrainer
from splitunet.wire.protocol import MetaKey
from splitunet.wire.transport import control_dxo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES = (2, 4, 4, 8, 8, 2)
CROP = (32, 32, 32)
CLIP = 0.01
# Noise far below the gradients, so that a step is the clipped mean alone.
QUIET = {"noise_multiplier": 1e-9, "max_grad_norm": CLIP, "poisson_sampling": False}


@pytest.fixture(scope="module")
def hospital_dir(tiny_parties):
    return tiny_parties.parent / "msd"


def _config(**overrides) -> UShapeConfig:
    return UShapeConfig(**{"features": FEATURES, "crop_size": CROP, "batch_size": 3, "seed": 3, **overrides})


def _hospital(hospital_dir, party="a", steps=2, **dp) -> HospitalTrainer:
    hospital = HospitalTrainer(HospitalFolder(hospital_dir, party=party))
    hospital.build(_config())
    hospital.plan_privacy(DPSettings(**{**QUIET, **dp}), steps)
    return hospital


def _norm(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def test_a_step_is_the_clipped_sum_of_each_cases_head_and_tail_gradient(hospital_dir):
    hospital = _hospital(hospital_dir)
    first, second = hospital.train_cases
    # Case `first` twice: its second crop must count for nothing.
    plan = {
        "keys": [first, second, first],
        "origins": [[0, 2, 1], [1, 0, 0], [2, 4, 1]],
        "size": list(CROP),
        "flips": [[False, True, False], [False, False, False], [True, False, False]],
    }
    hospital.planner.next_plan = lambda: plan
    middle = MiddleTrainer()
    middle.build(_config())
    u2 = middle.forward({"a": hospital.forward()})["a"]
    du2, _ = hospital.tail_step(u2)
    dx0 = middle.backward({"a": du2})["a"]  # the server's (1/B) dl_i/dx0 through the middle
    hospital.finish_step(dx0)
    applied = [p.grad.detach().clone() for p in hospital.private.optimizer.params]

    # By hand: the same initial head and tail, one case at a time, through the same u2 and dL/dx0.
    head, _ = prepare_for_dp(seeded_part("head", FEATURES, 3))
    tail, _ = prepare_for_dp(seeded_part("tail", FEATURES, 3))
    loss_fn, rows = make_loss("dice_ce"), len(plan["keys"])
    per_case = []
    for row in range(2):
        image, regions = hospital.folder.read(plan["keys"][row])
        crop = [
            extract_crop(volume, plan["origins"][row], plan["size"], plan["flips"][row]) for volume in (image, regions)
        ]
        head.zero_grad(set_to_none=True)
        tail.zero_grad(set_to_none=True)
        x0 = head(torch.from_numpy(np.ascontiguousarray(crop[0]))[None])
        skip = x0.detach().requires_grad_(True)
        target = torch.from_numpy(np.ascontiguousarray(crop[1]).astype(np.float32))[None]
        loss_fn(tail(u2[row : row + 1], skip), target).backward()
        x0.backward(skip.grad + rows * dx0[row : row + 1])
        per_case.append([p.grad.detach().clone() for p in (*head.parameters(), *tail.parameters())])
    norms = [_norm(gradient) for gradient in per_case]
    assert min(norms) > 10 * CLIP  # clipping acts on every case: without it this test fails
    expected = [
        sum(g[k] * min(1.0, CLIP / (n + 1e-6)) for g, n in zip(per_case, norms)) / 2 for k in range(len(applied))
    ]
    for got, want in zip(applied, expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-8)
    assert _norm(applied) <= CLIP * (1 + 1e-4)
    assert hospital.private.steps_taken == 1 and hospital.steps_applied == 1


def test_dp_hospitals_train_with_the_shared_middle_and_are_averaged(hospital_dir, tiny_parties):
    hospitals = {party: _hospital(hospital_dir, party, steps=2, noise_multiplier=1.0) for party in ("a", "b")}
    middle = MiddleTrainer()
    middle.build(_config())
    for _ in range(2):
        losses = in_process.train_iteration(hospitals, middle)
        assert all(np.isfinite(loss) for loss in losses.values())
    in_process.average_round(hospitals, round_index=0)
    for hospital in hospitals.values():
        budget = hospital.private.budget
        assert budget.sample_rate == 1.0 and budget.num_cases == hospital.num_train_cases
        assert hospital.epsilon() == pytest.approx(budget.epsilon, rel=1e-12)
        assert hospital.state_dict()["dp"]["steps_taken"] == 2
    # The averaged parts are the same for both: DP-SGD left the parts' names as they were.
    torch.testing.assert_close(hospitals["a"].tail.state_dict(), hospitals["b"].tail.state_dict())


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


def _setup(executor, fl_ctx):
    meta = {MetaKey.CONFIG: _config(batch_size=1).to_dict(), MetaKey.EXPERIMENT: "u_shape_unet"}
    return executor.execute(UTaskName.SETUP, control_dxo(meta).to_shareable(), fl_ctx, Signal())


def test_the_executor_refuses_a_job_above_the_cap_or_without_dp_before_its_reply_leaves(
    tmp_path, hospital_dir, monkeypatch
):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "poisson_sampling": False}
    executor = UShapeHospitalExecutor(dp=dp, dp_steps=40)
    above = _context(tmp_path / "above", hospital_dir, {"max_epsilon": 2.0})
    reply = _setup(executor, above)
    message = reply_error_message(reply)
    budget = executor.trainer.private.budget
    assert message.startswith("hospital-a: site hospital-a refuses this job: its projected epsilon")
    assert f"{budget.epsilon:.4g} at delta 1e-05 (sigma 1, sample rate 1, 40 steps" in message
    assert "cap max_epsilon 2 " in message and "BRATS" not in message and str(hospital_dir) not in message
    later = executor.execute(UTaskName.FORWARD, control_dxo({}).to_shareable(), above, Signal())
    assert reply_error_message(later) == message and executor.trainer.steps_applied == 0

    without = reply_error_message(
        _setup(UShapeHospitalExecutor(), _context(tmp_path / "none", hospital_dir, {"max_epsilon": 8}))
    )
    assert "trains without DP-SGD, so its epsilon is unbounded" in without

    within = UShapeHospitalExecutor(dp=dp, dp_steps=40)
    fl_ctx = _context(tmp_path / "within", hospital_dir, {"max_epsilon": 1e6})
    reply = _setup(within, fl_ctx)
    assert reply_error_message(reply) is None and reply["DXO"]["meta"][UMetaKey.NUM_CASES] == 2
    record = json.loads((tmp_path / "within" / "workspace" / "job-1" / "results.json").read_text())
    assert record["dp"]["budget"]["steps"] == 40 and record["dp"]["epsilon"] == 0.0
    assert record["dp"]["model_changes"]["replaced"] == [] and record["train_cases"] == 2
