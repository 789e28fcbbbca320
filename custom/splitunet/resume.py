"""Checkpoint names and the checks that make a resumed run continue exactly where the last checkpoint left it.

Every party writes its own ``last`` checkpoint at the same iteration (sites first, then the server, whose file is
the record that the round of saves completed). A resumed job loads them all and refuses to start if any party's
checkpoint was written at another iteration or with other model settings: mixing states would train on silently.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

from splitunet.checkpoint import load_checkpoint
from splitunet.errors import SplitUNetConfigError

__all__ = ["CHECKPOINT_TAGS", "decoder_checkpoint", "encoder_checkpoint", "read_checkpoint", "load_for_resume"]

CHECKPOINT_TAGS = ("best", "last")


def _checked_tag(tag: str) -> str:
    if tag not in CHECKPOINT_TAGS:
        raise ValueError(f"checkpoint tag must be one of {CHECKPOINT_TAGS}, got {tag!r}")
    return tag


def decoder_checkpoint(folder: str | Path, tag: str) -> Path:
    """The server's checkpoint file (decoder, optimiser, sampler, history) for ``tag``."""
    return Path(folder) / f"decoder_{_checked_tag(tag)}.pt"


def encoder_checkpoint(folder: str | Path, modality: str, tag: str) -> Path:
    """A site's checkpoint file (encoder and optimiser) for ``tag``."""
    return Path(folder) / f"encoder_{modality}_{_checked_tag(tag)}.pt"


def read_checkpoint(path: str | Path, party: str, purpose: str = "load it") -> dict:
    """Load a checkpoint written in an earlier job, with errors that say where a party looks for it.

    Raises:
        SplitUNetConfigError: no file or an unreadable one.
    """
    path = Path(path)
    if not path.is_file():
        raise SplitUNetConfigError(
            f"{party}: cannot {purpose}: no checkpoint at {path} (a party finds earlier checkpoints in the "
            "'checkpoint_dir' of its settings; without one they stay in the run folder of the earlier job)"
        )
    try:
        return load_checkpoint(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise SplitUNetConfigError(
            f"{party}: cannot {purpose}: {path} is not a readable checkpoint: {error}"
        ) from error


def load_for_resume(
    path: str | Path, party: str, iteration: int | None, config: Mapping, purpose: str = "resume"
) -> dict:
    """Load a checkpoint to resume from (or to infer with), checking it belongs to this run.

    Args:
        path: the checkpoint file.
        party: who loads it (named in every error).
        iteration: the iteration every party must have saved at; ``None`` to accept the file's (the server
            decides the iteration from its own checkpoint).
        config: the model settings of the resumed run (``SplitModelConfig.to_dict()``); they must equal the
            saved ones.
        purpose: what the checkpoint is loaded for, in error messages.

    Raises:
        SplitUNetConfigError: no file, an unreadable file, another iteration or other model settings.
    """
    state = read_checkpoint(path, party, purpose)
    saved_iteration = state.get("iteration")
    if iteration is not None and saved_iteration != iteration:
        raise SplitUNetConfigError(
            f"{party}: cannot {purpose} at iteration {iteration}: {path} was written at iteration {saved_iteration} "
            "(the parties' last checkpoints come from different save rounds)"
        )
    saved_config = dict(state.get("config") or {})
    differing = sorted(key for key in set(saved_config) | set(config) if saved_config.get(key) != config.get(key))
    if differing:
        changes = ", ".join(f"{key}: {saved_config.get(key)!r} -> {config.get(key)!r}" for key in differing)
        raise SplitUNetConfigError(
            f"{party}: cannot {purpose} from {path}: the model settings changed since it was written ({changes})"
        )
    return state
