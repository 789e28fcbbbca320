"""``splitunet leakage-splitfed``: the server's view of a SplitFed run, its report, and one quick run of the command.

The view and report tests build, in process, what a captured SplitFed run leaves in its server's run folder: the
encoder copies and averages recorded by the real ``CaptureWeights`` filter (the averages computed by the server's
own ``EncoderAveraging``, or by a server that does something else), activation captures at the iterations each
cohort was drawn, and the server's ``results.json``. The last test runs the command on the FLARE simulator.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fakes import server_filter_context
from nvflare.apis.fl_constant import FilterKey

from splitunet.atomic_files import write_json_atomic
from splitunet.checkpoint import save_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.attacks import EncoderPrefix, build_encoder
from splitunet.evaluation.intervals import t_interval
from splitunet.evaluation.leakage.captured_run import ACTIVATIONS, CapturedRun
from splitunet.evaluation.leakage.splitfed_leakage import (
    ROUND_END_ATTACKS,
    ROUND_START_ATTACKS,
    SplitFedLeakageSettings,
    invert_activations,
)
from splitunet.evaluation.leakage.splitfed_report import (
    ALL_ROUNDS,
    advantage_over_architecture,
    pool_inversion,
    splitfed_markdown,
    splitfed_summary,
)
from splitunet.evaluation.leakage.splitfed_view import (
    AttackPoint,
    SplitFedView,
    check_averages,
    recompute_averages,
)
from splitunet.filters import CaptureWeights
from splitunet.filters import capture_weights as capture_module
from splitunet.flare.encoder_averaging import EncoderAveraging
from splitunet.flare.encoder_weights import encoder_to_dxo
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES, MetaKey

FEATURES = (4, 8, 8, 16, 16, 4)
SITES = {"site-1": "flair", "site-2": "t1", "site-3": "flair", "site-4": "t1"}
CASES = {"site-1": 3, "site-2": 3, "site-3": 5, "site-4": 5}  # unequal: the weighting shows
EVERY, LAST = 2, 6
AVERAGINGS = (2, 4, 6)
# The cohorts drawn: (site-1, site-2) at 1, 3, 4 and 5; (site-3, site-4) at 2 and 6.
ENCODED = {"site-1": [1, 3, 4, 5], "site-2": [1, 3, 4, 5], "site-3": [2, 6], "site-4": [2, 6]}


def _copy(site: str, iteration: int) -> dict[str, np.ndarray]:
    """A site's encoder copy at an averaging: a seeded encoder of the test's widths (counters included)."""
    seed = 100 * iteration + int(site.split("-")[1])
    return {name: t.numpy().copy() for name, t in build_encoder(FEATURES, seed=seed).state_dict().items()}


def weighted_server(averaged, uploads):
    """The job's server: what EncoderAveraging computed."""
    return averaged


def unweighted_server(averaged, uploads):
    """A server that sends the plain mean of the copies, whatever the sites' case counts."""
    result = {}
    for modality in set(SITES.values()):
        copies = [uploads[site] for site in sorted(uploads) if SITES[site] == modality]
        result[modality] = {name: np.mean([c[name] for c in copies], axis=0).astype(copies[0][name].dtype)
                            for name in copies[0]}  # fmt: skip
    return result


def make_run(tmp_path, monkeypatch, server=weighted_server, captured=range(3, LAST + 1)):
    """A SplitFed workspace as ``run_splitfed_demo`` leaves it with both capture filters on."""
    run_dir = tmp_path / "simulator" / "server" / "simulate_job"
    monkeypatch.setattr(capture_module, "run_dir", lambda fl_ctx: run_dir)
    capture = CaptureWeights()
    groups = {modality: [s for s in SITES if SITES[s] == modality] for modality in ("flair", "t1")}
    averaging = EncoderAveraging(groups, CASES, EVERY)
    for iteration in AVERAGINGS:
        uploads = {site: _copy(site, iteration) for site in SITES}
        for site, state in uploads.items():
            dxo = encoder_to_dxo(state, {MetaKey.ITERATION: iteration})
            capture.process(dxo.to_shareable(), server_filter_context(site, FilterKey.IN))
        sent = server(averaging.average(uploads, SITES, iteration), uploads)
        for site in SITES:
            dxo = encoder_to_dxo(sent[SITES[site]], {MetaKey.ITERATION: iteration})
            capture.process(dxo.to_shareable(), server_filter_context(site, FilterKey.OUT))
    captured = set(captured)
    for site, iterations in ENCODED.items():
        for iteration in (i for i in iterations if i in captured):
            record = {"features": {"x0": torch.zeros(1, FEATURES[0], 8, 8, 8)}, "data_kind": ACTIVATIONS,
                      "site": site, "iteration": iteration, "plan": None, "filter_trail": []}  # fmt: skip
            save_checkpoint(record, run_dir / "captures" / ACTIVATIONS / site / f"iteration_{iteration:06d}.pt")
    results = {
        "model": SplitModelConfig(features=FEATURES).to_dict(),
        "sites": SITES,
        "iterations": LAST,
        "encoder_averaging": averaging.describe(),
    }
    write_json_atomic(results, run_dir / "results.json")
    write_json_atomic({"job": "split_unet_splitfed", "server_results": str(run_dir / "results.json")},
                      tmp_path / "results.json")  # fmt: skip
    return CapturedRun(tmp_path), sorted(captured)


def test_the_average_recomputed_from_the_copies_received_is_the_one_the_server_sent(tmp_path, monkeypatch):
    run, captured = make_run(tmp_path, monkeypatch)
    view = SplitFedView(run, captured)
    assert sorted(view.averagings) == list(AVERAGINGS)
    check = check_averages(view)
    assert check["checked"] and check["matches"] and check["max_abs_difference"] <= check["tolerance"]
    # Weighted by cases, not a plain mean: the recomputation is not the mean of the copies.
    averaging = view.averagings[4]
    recomputed = recompute_averages(averaging, view.modality_of, view.case_counts)["flair"]
    name = "conv_0.conv_0.conv.weight"
    plain = (averaging.received["site-1"][name] + averaging.received["site-3"][name]) / 2
    assert not torch.allclose(recomputed[name], plain)
    expected = (3 * averaging.received["site-1"][name].double() + 5 * averaging.received["site-3"][name].double()) / 8
    torch.testing.assert_close(recomputed[name], expected.float())


@pytest.mark.parametrize(
    "server",
    [
        unweighted_server,
        lambda averaged, uploads: {m: uploads["site-1" if m == "flair" else "site-2"] for m in averaged},
    ],
    ids=["plain_mean", "one_sites_copy"],
)
def test_a_server_that_sends_something_else_than_the_weighted_average_is_caught(tmp_path, monkeypatch, server):
    run, captured = make_run(tmp_path, monkeypatch, server=server)
    check = check_averages(SplitFedView(run, captured))
    assert check["checked"] and not check["matches"] and check["max_abs_difference"] > check["tolerance"]


def test_attack_points_count_each_sites_local_steps_within_the_rounds_captured_whole(tmp_path, monkeypatch):
    run, captured = make_run(tmp_path, monkeypatch)
    points = SplitFedView(run, captured).attack_points()
    assert points == [
        # Round after the averaging at 2 (iterations 3, 4): cohort 0 encoded twice; cohort 1 not at all.
        AttackPoint("site-1", "flair", 2, 3, 0),
        AttackPoint("site-1", "flair", 2, 4, 1, next_averaging=4),
        AttackPoint("site-2", "t1", 2, 3, 0),
        AttackPoint("site-2", "t1", 2, 4, 1, next_averaging=4),
        # Round after 4 (5, 6): each cohort once, so only its first activations (exactly the average).
        AttackPoint("site-1", "flair", 4, 5, 0),
        AttackPoint("site-2", "t1", 4, 5, 0),
        AttackPoint("site-3", "flair", 4, 6, 0),
        AttackPoint("site-4", "t1", 4, 6, 0),
    ]


def test_a_round_not_captured_whole_is_not_attacked_and_none_at_all_is_an_error(tmp_path, monkeypatch):
    run, captured = make_run(tmp_path, monkeypatch, captured=[3, 4, 5])  # iteration 6 missing
    view = SplitFedView(run, captured)
    assert view.rounds() == [(2, 4)]
    assert {point.averaging for point in view.attack_points()} == {2}
    with pytest.raises(SplitUNetConfigError, match="local steps"):
        SplitFedView(run, [3, 5]).attack_points()


def test_a_run_without_weight_captures_is_named(tmp_path, monkeypatch):
    run, captured = make_run(tmp_path, monkeypatch)
    for path in sorted((run.captures_dir / "weights").rglob("*.pt")):
        path.unlink()
    with pytest.raises(SplitUNetConfigError, match="CaptureWeights"):
        SplitFedView(run, captured)


def test_the_white_box_through_the_known_encoder_beats_the_wrong_one():
    """The attack reads the state it is given: through the encoder that made x0 it recovers the crop; through
    another it does not."""
    torch.manual_seed(0)
    settings = SplitFedLeakageSettings.quick()
    features = (8, 8, 16, 16, 16, 8)
    encoder = build_encoder(features, seed=1)
    grid = torch.linspace(-1, 1, 16)
    crop = (grid[:, None, None] * grid[None, :, None] + grid[None, None, :]).expand(1, 1, 16, 16, 16).contiguous()
    with torch.no_grad():
        x0 = EncoderPrefix(encoder, [0])(crop)[0]
    prior = torch.zeros_like(crop)
    errors = {}
    for name, state in (("right", encoder.state_dict()), ("wrong", build_encoder(features, seed=2).state_dict())):
        reconstruction, _ = invert_activations("white_box", {0: x0}, state, (16, 16, 16), features, 2e-3, prior,
                                               settings)  # fmt: skip
        aligned = (reconstruction - reconstruction.mean()) / reconstruction.std()
        target = (crop - crop.mean()) / crop.std()
        errors[name] = float((aligned - target).pow(2).mean())
    assert errors["right"] < errors["wrong"], errors
    with pytest.raises(ValueError, match="unknown attack"):
        invert_activations("oracle", {0: x0}, None, (16, 16, 16), features, 2e-3, prior, settings)
    with pytest.raises(ValueError, match="needs"):
        invert_activations("white_box_stale", {0: x0}, None, (16, 16, 16), features, 2e-3, prior, settings)


def test_quick_settings_capture_every_iteration_of_the_attacked_rounds_and_end_at_an_averaging():
    settings = SplitFedLeakageSettings.quick(seed=4)
    assert settings.seed == 4 and settings.server_args()["seed"] == 4
    assert settings.num_iterations % settings.every == 0
    assert settings.captured_iterations == list(range(settings.every + 1, settings.num_iterations + 1))
    with pytest.raises(ValueError):
        SplitFedLeakageSettings(sites_per_modality=1)
    with pytest.raises(ValueError):
        SplitFedLeakageSettings(cases=3)


def _row(site, averaging, iteration, attack, modality, ssim, prior, local_steps=0, steps_off=0):
    per_crop = {
        "ssim": list(ssim),
        "ssim_prior": list(prior),
        "ssim_brain": list(ssim),
        "ssim_prior_brain": list(prior),
    }
    return {"site": site, "averaging": averaging, "iteration": iteration, "attack": attack, "modality": modality,
            "local_steps": local_steps, "steps_off": steps_off, "per_crop": per_crop}  # fmt: skip


ROWS = [
    _row("site-1", 10, 11, "white_box", "flair", [0.9, 0.8], [0.3, 0.4]),
    _row("site-5", 10, 12, "white_box", "flair", [0.7, 0.6], [0.3, 0.2]),
    _row("site-1", 20, 21, "white_box", "flair", [0.5, 0.9], [0.4, 0.3]),
    _row("site-1", 10, 15, "white_box_stale", "flair", [0.4, 0.2], [0.3, 0.3], 3, 3),
    _row("site-1", 10, 15, "unsplit", "flair", [0.35, 0.1], [0.3, 0.3], 3, None),
    _row("site-5", 10, 19, "white_box_stale", "flair", [0.5, 0.5], [0.3, 0.3], 5, 5),
    _row("site-5", 10, 19, "unsplit", "flair", [0.3, 0.2], [0.3, 0.3], 5, None),
]


def test_crops_pool_over_sites_per_round_and_over_rounds_with_hand_checked_intervals():
    pooled = pool_inversion(ROWS)
    keys = [(e["averaging"], e["attack"]) for e in pooled]
    assert keys == [(10, "white_box"), (10, "white_box_stale"), (10, "unsplit"), (20, "white_box"),
                    (ALL_ROUNDS, "white_box"), (ALL_ROUNDS, "white_box_stale"), (ALL_ROUNDS, "unsplit")]  # fmt: skip
    every_round = next(e for e in pooled if e["averaging"] == ALL_ROUNDS and e["attack"] == "white_box")
    assert every_round["crops"] == 6 and every_round["sites"] == ["site-1", "site-5"]
    gains = [0.6, 0.4, 0.4, 0.4, 0.1, 0.6]
    for key in ("mean", "low", "high"):
        assert every_round["gain_brain"][key] == pytest.approx(t_interval(gains)[key])
    assert every_round["ssim_reported_brain"] == pytest.approx(max(0.9 + 0.8 + 0.7 + 0.6 + 0.5 + 0.9, 1.9) / 6)
    stale = next(e for e in pooled if e["averaging"] == 10 and e["attack"] == "white_box_stale")
    assert stale["local_steps"] == [3, 5] and stale["steps_off"] == [3, 5]
    # An attack below its prior reports the prior's SSIM.
    below = pool_inversion([_row("site-1", 10, 11, "unsplit", "t1", [0.1, 0.2], [0.3, 0.4], 1, None)])[0]
    assert below["ssim_reported_brain"] == pytest.approx(0.35) and below["steps_off"] is None


def test_the_averages_advantage_over_the_architecture_pairs_the_same_crops():
    advantage = advantage_over_architecture(ROWS)
    assert [(e["attack"], e["modality"], e["crops"]) for e in advantage] == [("white_box_stale", "flair", 4)]
    assert advantage[0]["difference"]["mean"] == pytest.approx((0.05 + 0.1 + 0.2 + 0.3) / 4)


def test_the_markdown_has_the_pooled_table_the_checks_and_the_verdicts():
    report = {
        "settings": SplitFedLeakageSettings().to_dict(),
        "job": "split_unet_splitfed",
        "run": {"iterations": 30, "dice": {"TC": 0.5, "WT": 0.6, "ET": 0.4}},
        "server_view": {
            "averagings": [10, 20],
            "copies_per_averaging": {10: 8, 20: 8},
            "parameters_per_copy": 5,
            "activation_captures": {"site-1": 4},
            "levels_received": {"x0": [8, 32, 32, 32]},
            "rounds_attacked": [[10, 20]],
        },  # fmt: skip
        "averages": {
            "checked": True,
            "averagings": {10: {}, 20: {}},
            "max_abs_difference": 0.0,
            "tolerance": 1e-6,
            "matches": True,
        },  # fmt: skip
        "replay": {"site-1@11": {"max_abs_error": 0.01, "tolerance": 0.02, "matches": True}},
        "inversion": ROWS,
        "elapsed_s": 100.0,
        "training_s": 60.0,
    }
    report["summary"] = splitfed_summary(report)
    text = splitfed_markdown(report)
    assert text.startswith("# Leakage in SplitFed")
    assert "| `white_box` | 0 | 0 | 0.73 (0.32; +0.42 [" in text  # flair pooled over both rounds: six crops
    assert "| `white_box_stale` | 3-5 | 3-5 |" in text
    assert "equals the one it sent at 2 averagings" in text and "at 1 of 1 first activations" in text
    assert set(report["summary"]["verdicts"]) == {"round_start", "within_round", "over_architecture"}


@pytest.mark.e2e
def test_quick_run_of_the_command_on_the_flare_simulator(splitfed_quick_leakage):
    """``splitunet leakage-splitfed --quick``: a real SplitFed run, its server's captures, every attack scored."""
    out = splitfed_quick_leakage  # the command's run (tests/conftest.py), also read by tests/e2e/test_splitfed_job.py
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Leakage in SplitFed")
    settings = SplitFedLeakageSettings.quick()
    # What crossed: every averaging's copies and averages, and the job's levels (x0 among them).
    assert report["server_view"]["averagings"] == list(
        range(settings.every, settings.num_iterations + 1, settings.every)
    )
    assert "x0" in report["server_view"]["levels_received"]
    # The server's average, recomputed from the copies it received, is the one it sent; the sites ran it.
    assert report["averages"]["checked"] and report["averages"]["matches"]
    assert report["replay"] and all(check["matches"] for check in report["replay"].values())
    rows = report["inversion"]
    assert {row["level"] for row in rows} == {"x0"}
    starts = [row for row in rows if row["local_steps"] == 0]
    assert {row["attack"] for row in starts} == set(ROUND_START_ATTACKS)
    assert len(starts) == len(report["replay"])
    assert {row["attack"] for row in rows if row["local_steps"] > 0} <= set(ROUND_END_ATTACKS)
    assert {row["modality"] for row in starts} == set(MODALITIES)
    for row in rows:
        assert all(math.isfinite(v) for v in row["per_crop"]["ssim_brain"]), row
    # Through the exact average the server recovers more than its prior in every modality.
    for entry in report["summary"]["inversion"]:
        if entry["attack"] == "white_box":
            assert entry["gain_brain"]["mean"] > 0, entry
