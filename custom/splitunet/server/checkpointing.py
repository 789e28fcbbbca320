"""The server's checkpoints: what a training run saves to resume from, taking it up again, and loading the decoder.

The server saves after every site has saved (its file is the record that the round of saves completed, see
:mod:`splitunet.resume`). Its checkpoint holds the decoder and optimiser, the crop sampler (with several sites per
modality: the cohort draws and each cohort's sampler), the site roster, which site held which modality, the
averaging of encoders that share a modality and the recorded history, so that a resumed run continues exactly where
it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from splitunet.checkpoint import save_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.networks import ServerDecoder
from splitunet.resume import decoder_checkpoint, load_for_resume
from splitunet.server.run_record import TrainingRecord
from splitunet.server.site_roster import SiteRoster
from splitunet.server.trainer import ServerTrainer, build_decoder
from splitunet.wire.model_config import SplitModelConfig

__all__ = ["load_resume_state", "save_server_state", "restore_server_state", "load_decoder", "decoder_sites"]


class _Resumable(Protocol):
    """What a checkpoint keeps of a part of the run: a crop sampler, the encoder averaging."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping) -> None: ...


def decoder_sites(sites: Sequence[str], site_modality: Mapping[str, str]) -> list[str]:
    """One site per decoder input: the first of each modality in ``sites`` (decoder order).

    A checkpoint's ``sites``, by which inference learns the modality of each decoder input. With one site per
    modality they are all the sites.
    """
    first: dict[str, str] = {}
    for site in sites:
        first.setdefault(site_modality[site], site)
    return list(first.values())


def load_resume_state(folder: str | Path, party: str, config: Mapping) -> tuple[dict, Path]:
    """The server's ``last`` checkpoint of an experiment, checked against this run's model settings.

    Returns:
        ``(state, path)``.

    Raises:
        SplitUNetConfigError: no checkpoint, an unreadable one, or other model settings.
    """
    path = decoder_checkpoint(folder, "last")
    return load_for_resume(path, party, None, config), path


def save_server_state(
    folder: str | Path,
    tag: str,
    trainer: ServerTrainer,
    planner: _Resumable,
    roster: SiteRoster,
    record: TrainingRecord,
    *,
    iteration: int,
    site_modality: Mapping[str, str],
    site_saved_iteration: Mapping[str, int],
    crop_size: Sequence[int],
    averaging: _Resumable | None = None,
) -> Path:
    """Write the server's ``tag`` checkpoint at ``iteration``; returns its path.

    Args:
        planner: the crop sampler (a :class:`~splitunet.data.sampling.RandomCropPlanner` or a
            :class:`~splitunet.server.cohorts.CohortPlanner`).
        averaging: the encoder averaging of a run with several sites per modality.
    """
    state = trainer.state_dict()
    sites = decoder_sites(roster.sites, site_modality)
    state.update(
        iteration=iteration,
        sites=sites,
        decoder_modalities=[site_modality[site] for site in sites],
        site_modality=dict(site_modality),
        site_saved_iteration=dict(site_saved_iteration),
        crop_size=list(crop_size),
        planner=planner.state_dict(),
        roster=roster.state_dict(),
        averaging=averaging.state_dict() if averaging is not None else None,
        results=record.resumable(),
    )
    return save_checkpoint(state, decoder_checkpoint(folder, tag))


def restore_server_state(
    saved: Mapping,
    trainer: ServerTrainer,
    planner: _Resumable,
    roster: SiteRoster,
    record: TrainingRecord,
    site_modality: Mapping[str, str],
    averaging: _Resumable | None = None,
) -> int:
    """Take up a checkpoint of :func:`save_server_state` in a run built with the same settings.

    Args:
        saved: the checkpoint.
        trainer, planner, roster, record: this run's, built and set up; they take the saved states.
        site_modality: site -> modality of the sites in this run.
        averaging: this run's encoder averaging, if it has one; it takes the saved rounds and drift correction.

    Returns:
        the iteration the checkpoint was written at.

    Raises:
        SplitUNetConfigError: the sites hold other modalities than when the checkpoint was written.
    """
    if dict(saved["site_modality"]) != dict(site_modality):
        raise SplitUNetConfigError(
            f"cannot resume: the checkpoint was written with sites {saved['site_modality']}, this run has "
            f"{dict(site_modality)}"
        )
    trainer.load_state_dict(saved)
    planner.load_state_dict(saved["planner"])
    roster.load_state_dict(saved["roster"])
    if averaging is not None and saved.get("averaging") is not None:
        averaging.load_state_dict(saved["averaging"])
    iteration = int(saved["iteration"])
    record.restore(saved["results"], iteration)
    return iteration


def load_decoder(state: Mapping, device: torch.device | str) -> ServerDecoder:
    """The trained decoder of a server checkpoint, on ``device``, ready to infer."""
    decoder = build_decoder(SplitModelConfig.from_dict(state["config"]), int(state["num_sites"]))
    decoder.load_state_dict(state["decoder"])
    return decoder.to(device).eval()
