"""server.validation: Dice every round; at the end Dice without each modality and preview files."""

from __future__ import annotations

import numpy as np
import torch

from splitunet.data.labels import get_layout
from splitunet.data.nifti_io import load_nifti
from splitunet.server.run_settings import TrainingSettings
from splitunet.server.site_roster import SiteRoster
from splitunet.server.validation import Validation

SHAPE = (4, 5, 6)


class _Labels:
    def read(self, case):
        return np.zeros((3, *SHAPE), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])


class _Trainer:
    """The part of ServerTrainer validation uses; its Dice says which encode function it was given."""

    def __init__(self):
        self.labels = _Labels()
        self.calls = []

    def case_name(self, key):
        return f"BRATS_{key}"

    def score(self, keys, shapes, encode, roi_size, sw_batch_size, overlap, keep=()):
        self.calls.append((tuple(keys), encode, tuple(roi_size), sw_batch_size, overlap, tuple(keep)))
        dice = {"TC": 0.1, "WT": 0.2, "ET": 0.3, "mean": encode}
        hd95 = {"TC": 4.0, "WT": 3.0, "ET": 2.0, "mean": 3.0}
        probabilities = torch.zeros(3, *SHAPE)
        probabilities[1, 0, 0, 0] = 0.9  # one whole-tumour voxel
        return dice, hd95, {key: probabilities for key in keep}


def _validation(trainer, mean_fusion=True):
    settings = TrainingSettings(
        crop_size=(32, 32, 32),
        sw_batch_size=2,
        sw_overlap=0.5,
        num_preview_cases=1,
        fusion="mean" if mean_fusion else "concat",
    )
    return Validation(trainer, ["k1", "k2"], {}, get_layout("msd"), settings)


def _encode_for(without):
    return {None: 0.9, "site-1": 0.4, "site-2": 0.6}[without]  # stands for an encode function


def test_an_intermediate_round_scores_every_site_together(tmp_path):
    trainer, lines = _Trainer(), []
    roster = SiteRoster(["site-1", "site-2"], {"site-1": "flair", "site-2": "t1"})
    outcome = _validation(trainer).run(4, _encode_for, roster, final=False, out_dir=tmp_path, log=lines.append)
    assert outcome.dice["mean"] == 0.9 and outcome.dice_without is None and outcome.predictions is None
    assert outcome.hd95["TC"] == 4.0 and "HD95 TC 4.0 WT 3.0 ET 2.0 voxels" in lines[0]
    assert trainer.calls == [(("k1", "k2"), 0.9, (32, 32, 32), 2, 0.5, ())]
    assert lines[0].startswith("validation at iteration 4: Dice TC 0.100 WT 0.200 ET 0.300 (mean 0.900) on 2 held")


def test_the_final_round_scores_each_absent_modality_and_writes_previews(tmp_path):
    trainer, lines = _Trainer(), []
    roster = SiteRoster(["site-1", "site-2"], {"site-1": "flair", "site-2": "t1"})
    outcome = _validation(trainer).run(8, _encode_for, roster, final=True, out_dir=tmp_path, log=lines.append)
    assert {modality: dice["mean"] for modality, dice in outcome.dice_without.items()} == {"flair": 0.4, "t1": 0.6}
    assert trainer.calls[0][-1] == ("k1",)  # the first num_preview_cases held-out cases are kept
    assert lines[1] == "validation at iteration 8 without flair (site-1): Dice TC 0.100 WT 0.200 ET 0.300 (mean 0.400)"
    # Named by case key: FLARE archives the server's run folder.
    path = tmp_path / "predictions" / "k1.nii.gz"
    assert outcome.predictions == {"k1": str(path)}
    image = load_nifti(path, party="server", in_memory=True)
    assert np.allclose(image.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert np.count_nonzero(np.asarray(image.dataobj)) == 1


def test_without_each_needs_mean_fusion_and_two_active_sites(tmp_path):
    roster = SiteRoster(["site-1", "site-2"], {"site-1": "flair", "site-2": "t1"})
    concat = _validation(_Trainer(), mean_fusion=False).run(8, _encode_for, roster, True, tmp_path, print)
    assert concat.dice_without is None
    roster.drop("site-2", 5, "silent")
    alone = _validation(_Trainer()).run(8, _encode_for, roster, True, tmp_path, print)
    assert alone.dice_without is None and alone.predictions


def test_with_several_sites_per_modality_each_modality_is_left_out_once(tmp_path):
    trainer, lines = _Trainer(), []
    sites = {"site-1": "flair", "site-2": "t1", "site-5": "flair"}
    roster = SiteRoster(["site-1", "site-5", "site-2"], sites)
    asked = []

    def encode_for(without):
        asked.append(without)
        return 0.5

    outcome = _validation(trainer).run(8, encode_for, roster, final=True, out_dir=tmp_path, log=lines.append)
    # One round without each modality, named by every site that holds it.
    assert asked == [None, "site-1", "site-2"] and set(outcome.dice_without) == {"flair", "t1"}
    assert lines[1].startswith("validation at iteration 8 without flair (site-1, site-5): ")
    roster.drop("site-2", 6, "silent")
    assert _validation(_Trainer()).run(8, encode_for, roster, True, tmp_path, print).dice_without is None
