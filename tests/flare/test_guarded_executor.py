"""flare.guarded_executor: tasks reach their handlers; failures reach the server by key only; a cap refusal sticks."""

from __future__ import annotations

from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from splitunet.dp.site_cap import EpsilonCapExceeded
from splitunet.errors import SplitUNetDataError
from splitunet.flare.guarded_executor import GuardedTaskExecutor
from splitunet.flare.replies import reply_error_message
from splitunet.wire.transport import control_dxo

CASE = "BraTS-Hospital-00042"
DATA_DIR = "/data/hospital/flair"


class _Executor(GuardedTaskExecutor):
    def __init__(self):
        super().__init__()
        self.private.use_secret("secret")
        self.private.add_cases([CASE])
        self.private.add_dir("data_dir", DATA_DIR)
        self.calls = []

    def task_handlers(self):
        return {"ok": self._ok, "bad_case": self._bad_case, "leaky": self._leaky, "cap": self._cap}

    def _ok(self, dxo, party, fl_ctx):
        self.calls.append(dxo.get_meta_prop("n"))
        return control_dxo({"party": party}).to_shareable()

    def _bad_case(self, dxo, party, fl_ctx):
        raise SplitUNetDataError("unreadable volume", party=party, case=CASE, file=f"{DATA_DIR}/{CASE}.nii.gz")

    def _leaky(self, dxo, party, fl_ctx):
        raise ValueError(f"shape mismatch in {DATA_DIR}/{CASE}.nii.gz")

    def _cap(self, dxo, party, fl_ctx):
        raise EpsilonCapExceeded("projected epsilon 12.0 exceeds the cap 8.0")


def _run(executor, task, meta=None):
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    return executor.execute(task, control_dxo(meta or {}).to_shareable(), fl_ctx, Signal())


def test_a_task_reaches_its_handler_and_an_unknown_one_is_refused():
    executor = _Executor()
    assert reply_error_message(_run(executor, "ok", {"n": 3})) is None
    assert executor.calls == [3]
    assert _run(executor, "nope").get_return_code() == ReturnCode.TASK_UNKNOWN


def test_failures_reach_the_server_without_case_ids_or_paths():
    executor = _Executor()
    key = executor.private.key(CASE)
    data_error = reply_error_message(_run(executor, "bad_case"))
    assert key in data_error and CASE not in data_error and DATA_DIR not in data_error
    other = reply_error_message(_run(executor, "leaky"))
    assert other.startswith("site-1: ") and "shape mismatch" in other
    assert CASE not in other and DATA_DIR not in other


def test_an_epsilon_cap_refusal_answers_every_later_task():
    executor = _Executor()
    first = reply_error_message(_run(executor, "cap"))
    assert "exceeds the cap 8.0" in first
    assert reply_error_message(_run(executor, "ok")) == first
    assert executor.calls == []
