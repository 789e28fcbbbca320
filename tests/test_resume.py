"""resume: checkpoint names, and resuming refuses a checkpoint of another iteration or other model settings."""

from __future__ import annotations

import pytest

from splitunet.checkpoint import save_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.resume import decoder_checkpoint, encoder_checkpoint, load_for_resume
from splitunet.wire.model_config import SplitModelConfig

CONFIG = SplitModelConfig(features=(4, 8, 8, 16, 16)).to_dict()


def test_checkpoint_names(tmp_path):
    assert decoder_checkpoint(tmp_path, "last") == tmp_path / "decoder_last.pt"
    assert encoder_checkpoint(tmp_path, "t1gd", "best") == tmp_path / "encoder_t1gd_best.pt"
    with pytest.raises(ValueError, match="tag"):
        decoder_checkpoint(tmp_path, "latest")


def test_load_checks_iteration_and_settings(tmp_path):
    path = save_checkpoint({"iteration": 4, "config": CONFIG, "weights": [1, 2]}, tmp_path / "encoder_t1_last.pt")
    assert load_for_resume(path, "site-2", 4, CONFIG)["weights"] == [1, 2]
    assert load_for_resume(path, "server", None, CONFIG)["iteration"] == 4
    with pytest.raises(SplitUNetConfigError, match=r"site-2: cannot resume at iteration 6: .* at iteration 4"):
        load_for_resume(path, "site-2", 6, CONFIG)
    changed = SplitModelConfig(features=(4, 8, 8, 16, 16), fusion="mean").to_dict()
    with pytest.raises(SplitUNetConfigError, match="fusion: 'concat' -> 'mean'"):
        load_for_resume(path, "site-2", 4, changed)


def test_missing_and_unreadable_checkpoints_are_named(tmp_path):
    missing = tmp_path / "decoder_last.pt"
    expected = f"server: cannot resume: no checkpoint at {missing}.*checkpoint_dir"
    with pytest.raises(SplitUNetConfigError, match=expected):
        load_for_resume(missing, "server", None, CONFIG)
    missing.write_bytes(b"not a checkpoint")
    with pytest.raises(SplitUNetConfigError, match="not a readable checkpoint"):
        load_for_resume(missing, "server", None, CONFIG)
