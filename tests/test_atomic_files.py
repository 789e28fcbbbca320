"""atomic_files: a write that fails or is killed half-way keeps the previous file and leaves no temporary one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from splitunet.atomic_files import atomic_path, atomic_write_bytes, write_json_atomic, write_text_atomic
from splitunet.checkpoint import load_checkpoint, save_checkpoint


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    path = save_checkpoint({"iteration": 1}, tmp_path / "decoder_best.pt")

    def broken_writer(handle):
        handle.write(b"partial bytes")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_bytes(path, broken_writer)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["decoder_best.pt"]


def test_json_and_text(tmp_path):
    path = write_json_atomic({"dice": {"TC": 0.5}}, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == {"dice": {"TC": 0.5}} and path.read_text().endswith("}\n")
    assert write_text_atomic("tumour\n", tmp_path / "note.txt").read_text() == "tumour\n"


def test_atomic_path_publishes_only_a_finished_file_under_the_suffix_the_writer_needs(tmp_path):
    final = tmp_path / "seg.nii.gz"
    final.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="crashed"):
        with atomic_path(final, suffix=".nii.gz") as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".seg.nii.gz.")
            tmp.write_bytes(b"half")
            raise RuntimeError("crashed")
    assert final.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
    with atomic_path(final, suffix=".nii.gz") as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


_KILLED_WRITER = """
import io, sys, time, torch
from splitunet.atomic_files import atomic_write_bytes
from splitunet.checkpoint import save_checkpoint
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


def test_published_files_get_the_mode_a_plain_write_would_or_keep_the_replaced_ones(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        fresh = write_text_atomic("a", tmp_path / "fresh.json")
        assert fresh.stat().st_mode & 0o777 == 0o644  # the temporary file was 0600; the result is not
        fresh.chmod(0o640)
        assert write_text_atomic("b", fresh).stat().st_mode & 0o777 == 0o640
        assert write_text_atomic("c", tmp_path / "secret.txt", mode=0o600).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)
