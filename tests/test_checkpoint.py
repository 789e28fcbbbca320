"""checkpoint: torch state round-trips through the atomic write; only plain tensors and containers load."""

from __future__ import annotations

import pytest
import torch

from splitunet.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip(tmp_path):
    state = {"weights": torch.arange(5.0), "iteration": 7}
    path = save_checkpoint(state, tmp_path / "models" / "decoder_best.pt")
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 7 and torch.equal(loaded["weights"], state["weights"])


class _NotATensor:
    pass


def test_load_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _NotATensor()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)
