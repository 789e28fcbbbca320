"""server.checkpointing: the server's checkpoint takes a run up again where it stopped; the decoder loads to infer."""

from __future__ import annotations

import pytest
import torch

from splitunet.data.party_data import LabelFolder
from splitunet.data.sampling import RandomCropPlanner
from splitunet.errors import SplitUNetConfigError
from splitunet.flare.encoder_averaging import EncoderAveraging, make_correction
from splitunet.server.checkpointing import (
    decoder_sites,
    load_decoder,
    load_resume_state,
    restore_server_state,
    save_server_state,
)
from splitunet.server.cohorts import CohortPlanner
from splitunet.server.run_record import TrainingRecord
from splitunet.server.site_roster import SiteRoster
from splitunet.server.trainer import ServerTrainer
from splitunet.wire.model_config import SplitModelConfig

CONFIG = SplitModelConfig(features=(4, 4, 4, 4, 4), skip_levels=(), fusion="mean", seed=1)
MODALITY = {"site-1": "flair", "site-2": "t1"}
SHAPES = {"k1": (40, 40, 40), "k2": (36, 40, 44)}


def _run(tiny_parties):
    """A freshly built server side of a run: trainer, crop planner, roster and record."""
    trainer = ServerTrainer(LabelFolder(tiny_parties / "labels", party="server"), "secret")
    trainer.build(CONFIG, num_sites=2)
    planner = RandomCropPlanner(SHAPES, (32, 32, 32), 2, seed=0)
    roster = SiteRoster(list(MODALITY), MODALITY, modality_dropout=0.5, seed=7)
    record = TrainingRecord()
    record.start(sites=dict(MODALITY))
    return trainer, planner, roster, record


def _save(tmp_path, run, tag="last", iteration=3):
    trainer, planner, roster, record = run
    return save_server_state(
        tmp_path,
        tag,
        trainer,
        planner,
        roster,
        record,
        iteration=iteration,
        site_modality=MODALITY,
        site_saved_iteration={"site-1": iteration, "site-2": iteration},
        crop_size=(32, 32, 32),
    )


def test_a_restored_run_continues_exactly_where_the_saved_one_stopped(tmp_path, tiny_parties):
    saved_run = _run(tiny_parties)
    trainer, planner, roster, record = saved_run
    with torch.no_grad():
        next(trainer.decoder.parameters()).add_(1.0)  # trained weights differ from the initial ones
    planner.next_plan()
    roster.step_participants()
    record.add_step(0.7, 0.1, 0.1, 0.3, 10, [])
    record.add_validation(3, 0.7, {"TC": 0.1, "WT": 0.2, "ET": 0.3, "mean": 0.2})
    path = _save(tmp_path, saved_run)
    assert path == tmp_path / "decoder_last.pt"

    saved, loaded_from = load_resume_state(tmp_path, "server", CONFIG.to_dict())
    assert loaded_from == path and saved["site_saved_iteration"] == {"site-1": 3, "site-2": 3}
    assert saved["sites"] == ["site-1", "site-2"] and saved["crop_size"] == [32, 32, 32]
    resumed = _run(tiny_parties)
    assert restore_server_state(saved, *resumed, site_modality=MODALITY) == 3
    r_trainer, r_planner, r_roster, r_record = resumed
    for ours, theirs in zip(trainer.decoder.parameters(), r_trainer.decoder.parameters()):
        assert torch.equal(ours, theirs)
    assert r_planner.next_plan() == planner.next_plan()
    assert r_roster.step_participants() == roster.step_participants()
    assert r_record.iterations == 3 and r_record.loss_curve == [0.7] and r_record.best == record.best


def test_resuming_with_other_modalities_or_other_settings_is_refused(tmp_path, tiny_parties):
    _save(tmp_path, _run(tiny_parties))
    saved, _ = load_resume_state(tmp_path, "server", CONFIG.to_dict())
    with pytest.raises(SplitUNetConfigError, match="cannot resume: the checkpoint was written with sites"):
        restore_server_state(saved, *_run(tiny_parties), site_modality={"site-1": "t1", "site-2": "flair"})
    other = SplitModelConfig(features=(4, 4, 4, 4, 4), skip_levels=(), fusion="concat", seed=1)
    with pytest.raises(SplitUNetConfigError, match="fusion: 'mean' -> 'concat'"):
        load_resume_state(tmp_path, "server", other.to_dict())


def test_the_saved_decoder_loads_for_inference(tmp_path, tiny_parties):
    run = _run(tiny_parties)
    path = _save(tmp_path, run, tag="best")
    decoder = load_decoder(torch.load(path, weights_only=True), "cpu")
    assert not decoder.training
    for ours, theirs in zip(run[0].decoder.parameters(), decoder.parameters()):
        assert torch.equal(ours, theirs)


def test_with_several_sites_per_modality_the_cohort_draws_and_the_averaging_resume(tmp_path, tiny_parties):
    modality = {"a-flair": "flair", "b-flair": "flair", "a-t1": "t1", "b-t1": "t1"}
    groups = {"flair": ["a-flair", "b-flair"], "t1": ["a-t1", "b-t1"]}
    counts = {"a-flair": 2, "b-flair": 1, "a-t1": 2, "b-t1": 1}

    def run():
        trainer, _, _, record = _run(tiny_parties)
        planner = CohortPlanner([SHAPES, {"k3": (40, 40, 40)}], (32, 32, 32), 2, seed=0)
        roster = SiteRoster(["a-flair", "b-flair", "a-t1", "b-t1"], modality)
        averaging = EncoderAveraging(groups, counts, every=2, correction=make_correction({}))
        return trainer, planner, roster, record, averaging

    trainer, planner, roster, record, averaging = run()
    for _ in range(5):
        planner.next_plan()
    weights = {n: v.numpy() for n, v in torch.nn.Linear(2, 2).state_dict().items()}
    averaging.average({site: weights for site in modality}, modality, 2)
    path = save_server_state(
        tmp_path,
        "last",
        trainer,
        planner,
        roster,
        record,
        iteration=5,
        site_modality=modality,
        site_saved_iteration=dict.fromkeys(modality, 5),
        crop_size=(32, 32, 32),
        averaging=averaging,
    )
    saved = torch.load(path, weights_only=True)
    # Inference reads one site per decoder input.
    assert saved["sites"] == ["a-flair", "a-t1"] and saved["decoder_modalities"] == ["flair", "t1"]
    assert decoder_sites(["a-flair", "b-flair", "a-t1", "b-t1"], modality) == ["a-flair", "a-t1"]
    resumed = run()
    assert restore_server_state(saved, *resumed[:4], site_modality=modality, averaging=resumed[4]) == 5
    assert resumed[1].steps == planner.steps and resumed[1].next_plan() == planner.next_plan()
    assert resumed[4].rounds == 1 and resumed[4].correction.parts == ["encoder/flair", "encoder/t1"]
