"""checkpoint: atomic writes keep the previous file when a write fails half-way."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from splitunet.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint, write_json_atomic


def test_round_trip(tmp_path):
    state = {"weights": torch.arange(5.0), "iteration": 7}
    path = save_checkpoint(state, tmp_path / "models" / "decoder_best.pt")
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 7 and torch.equal(loaded["weights"], state["weights"])


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    path = save_checkpoint({"iteration": 1}, tmp_path / "decoder_best.pt")

    def broken_writer(handle):
        handle.write(b"partial bytes")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_bytes(path, broken_writer)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["decoder_best.pt"]


def test_json(tmp_path):
    path = write_json_atomic({"dice": {"TC": 0.5}}, tmp_path / "results.json")
    assert json.loads(path.read_text()) == {"dice": {"TC": 0.5}}


_KILLED_WRITER = """
import io, sys, time, torch
from splitunet.checkpoint import atomic_write_bytes, save_checkpoint
path, ready = sys.argv[1], sys.argv[2]
save_checkpoint({"step": 1, "weights": torch.full((1000,), 1.0)}, path)
buffer = io.BytesIO()
torch.save({"step": 2, "weights": torch.full((1000,), 2.0)}, buffer)
data = buffer.getvalue()

def slow_writer(handle):  # a large checkpoint on a slow disk: the kill lands while bytes are still going out
    open(ready, "w").close()
    for start in range(0, len(data), 64):
        handle.write(data[start : start + 64])
        handle.flush()
        time.sleep(0.01)

atomic_write_bytes(path, slow_writer)
"""


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path, ready = tmp_path / "decoder_last.pt", tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never started its second write"
            time.sleep(0.01)
        time.sleep(0.2)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    partial = list(tmp_path.glob(".decoder_last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # killed inside the second write, as intended
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.all(state["weights"] == 1.0)  # the first checkpoint, whole
