"""checkpoint: atomic writes keep the previous file when a write fails half-way."""

from __future__ import annotations

import json

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
