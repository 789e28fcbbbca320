import importlib
import json

import pytest

from splitunet.evaluation.sweep import FULL_SWEEP, PRESETS, STANDARD_SWEEP, SweepPreset
from splitunet.evaluation.sweep_report import label_summary, pool_inversions, sweep_markdown, tradeoff_points
from splitunet.tools.deployment import copy_job_with_overrides, find_job, job_filters


@pytest.mark.parametrize("setting", FULL_SWEEP, ids=lambda s: s.label)
def test_every_setting_makes_a_valid_job(setting, tmp_path):
    job = copy_job_with_overrides(
        find_job(setting.job), tmp_path / "job", setting.server_args, None, setting.filter_args
    )
    for config_path in job.glob("*/config/*.json"):
        config = json.loads(config_path.read_text())
        for entry in job_filters(config):
            module, name = entry["path"].rsplit(".", 1)
            getattr(importlib.import_module(module), name)(**entry.get("args", {}))  # validates its arguments
        for workflow in config.get("workflows", []):
            blocked = [
                f
                for f in job_filters(json.loads((job / "app/config/config_fed_client.json").read_text()))
                if f["path"].endswith("BlockSkipLevels")
            ]
            if blocked:
                # The decoder must not expect a level the sites withhold (it would stop at setup).
                assert not set(blocked[0]["args"]["levels"]) & set(workflow["args"]["skip_levels"])


def _defense(job_name: str) -> str:
    """The defense a job ships: its sites' filter classes, or its server's (gradient defenses), guards left out, or
    the sites' training-time defense (NoPeek)."""
    found = {}
    for config_path in find_job(job_name).glob("*/config/*.json"):
        config = json.loads(config_path.read_text())
        names = {entry["path"].rsplit(".", 1)[-1] for entry in job_filters(config)}
        if any(executor["executor"]["args"].get("nopeek") for executor in config.get("executors", [])):
            names.add("NoPeek")
        found[config_path.stem] = sorted(names - {"FeatureGuard"})
    sites, server = found["config_fed_client"], found["config_fed_server"]
    return "+".join(sites) if sites else "+".join(f"{name}@server" for name in server)


def test_full_sweeps_two_strengths_of_every_shipped_defense_and_the_standard_one_each():
    *single, protected = FULL_SWEEP
    assert protected.job == "split_unet_protected"
    defenses = [_defense(setting.job) for setting in single]
    assert defenses[0] == ""  # the baseline comes first
    for defense in set(defenses[1:]):
        assert defenses.count(defense) == 2, defense
    # noise, gradient noise (server side), dropout, top-k, quantize, block, NoPeek (site training)
    assert len(set(defenses[1:])) == 7
    assert len({setting.label for setting in FULL_SWEEP}) == len(FULL_SWEEP)
    standard = [_defense(setting.job) for setting in STANDARD_SWEEP]
    assert sorted(set(standard)) == sorted(set(defenses + [_defense(protected.job)]))
    assert len(standard) == len(set(standard))  # each once
    assert all(setting in FULL_SWEEP for setting in PRESETS["quick"].settings)


def test_presets_attack_first_middle_last_and_capture_the_gradients_that_follow():
    preset = SweepPreset("p", (), iterations=80)
    assert preset.attack_iterations() == (1, 40, 80)
    assert preset.capture_iterations() == (1, 2, 40, 41, 80)
    assert SweepPreset("p", (), iterations=2).attack_iterations() == (1, 2)
    assert PRESETS["full"].iterations == 300 and PRESETS["standard"].iterations == 80


def _inversion(attack, level, ssim_brain, prior_brain):
    return {
        "attack": attack,
        "level": level,
        "seconds": 1.0,
        "per_crop": {
            "ssim": ssim_brain,
            "ssim_prior": prior_brain,
            "ssim_brain": ssim_brain,
            "ssim_prior_brain": prior_brain,
        },
    }


def _report(site_rows, labels=None):
    return {
        "sites": {site: {"inversion": rows} for site, rows in site_rows.items()},
        "label_inference_by_site": labels or {},
    }


def test_crops_are_pooled_over_sites_with_a_t_interval_and_a_per_crop_gain():
    report = _report(
        {
            "site-1": [_inversion("white_box", "x0", [0.9, 0.7], [0.3, 0.3])],
            "site-2": [_inversion("white_box", "x0", [0.5, float("nan")], [0.2, 0.4])],
        }
    )
    (entry,) = pool_inversions(report)
    assert entry["crops"] == 4 and entry["sites"] == ["site-1", "site-2"] and entry["seconds"] == 2.0
    # The crop without a brain-mask score is left out of both the SSIM and the gain.
    assert entry["ssim_brain"]["n"] == 3
    assert entry["ssim_brain"]["mean"] == pytest.approx(0.7)
    # stdev of (0.9, 0.7, 0.5) is 0.2; t(2) = 4.303.
    assert entry["ssim_brain"]["high"] - entry["ssim_brain"]["mean"] == pytest.approx(4.303 * 0.2 / 3**0.5, abs=1e-6)
    assert entry["gain_brain"]["mean"] == pytest.approx((0.6 + 0.4 + 0.3) / 3)
    assert entry["ssim_prior_brain"] == pytest.approx((0.3 + 0.3 + 0.2) / 3)


def test_tradeoff_points_carry_the_seeds_dice_interval_and_the_best_attacks_ssim_interval():
    def inversion(mean, low, high):
        return {"ssim_brain": {"mean": mean, "low": low, "high": high, "n": 8}, "ssim_prior_brain": 0.3}

    seeds = {seed: dict.fromkeys(("TC", "WT", "ET"), dice) for seed, dice in (("0", 0.9), ("1", 0.7), ("2", 0.8))}
    row = {
        "label": "noise",
        "attacks": {"100": {"inversion": [inversion(0.5, 0.4, 0.6), inversion(0.7, 0.65, 0.75)]}},
        "utility": {"dice_by_seed": seeds, "dice_mean": {"TC": 0.8, "WT": 0.8, "ET": 0.8}},
    }
    untrained = {"label": "no utility", "attacks": row["attacks"], "utility": None}
    (point,) = tradeoff_points([row, untrained], "100")
    assert point["ssim"] == 0.7 and point["ssim_interval"]["low"] == 0.65  # the best attack, with its own interval
    # Per-seed means 0.9, 0.7, 0.8: mean 0.8, t(2) 4.303 * 0.1 / sqrt(3) either side.
    assert point["dice"] == pytest.approx(0.8)
    assert point["dice_interval"]["high"] - 0.8 == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert tradeoff_points([row], "200") == []


def test_label_summary_takes_the_better_attack_and_the_largest_gain():
    labels = {
        "site-1": {
            **_labels(0.7, 0.75, 0.72, own=(0.76, 0.74, 0.73)),
            "gain_variant": "smoothed",
            "gain_over_own_image": 0.01,
        },
        "site-2": {
            **_labels(0.6, 0.5, 0.8, own=(0.1, 0.2, 0.3)),
            "gain_variant": "adaptive",
            "gain_over_own_image": 0.5,
        },
        "site-3": None,
    }
    summary = label_summary(_report({}, labels))
    assert summary["by_site"]["site-1"]["gain_over_own_image"] == pytest.approx(0.01)
    assert summary["by_site"]["site-1"]["dice_own_image"] == pytest.approx(0.74)  # the smoothed attack's own count
    assert summary["by_site"]["site-2"]["dice"] == 0.8
    assert summary["by_site"]["site-2"]["dice_own_image"] == pytest.approx(0.3)
    assert summary["largest_gain"] == pytest.approx(0.5)
    assert "site-3" not in summary["by_site"]


def test_label_summary_refuses_a_report_scored_against_one_baseline_for_every_attack():
    stale = {"site-1": {"dice": 0.7, "dice_smoothed": 0.75, "dice_adaptive": 0.72, "dice_own_image": 0.76}}
    with pytest.raises(ValueError, match="refresh"):
        label_summary(_report({}, stale))


def _labels(plain, smoothed, adaptive, own):
    return {
        "dice": plain,
        "dice_smoothed": smoothed,
        "dice_adaptive": adaptive,
        "dice_own_image": own[0],
        "dice_own_image_smoothed": own[1],
        "dice_own_image_adaptive": own[2],
        "auc": 0.99,
    }


def test_markdown_tables():
    first = _report(
        {
            "site-1": [
                _inversion("white_box", "x0", [0.9, 0.9], [0.3, 0.3]),
                _inversion("unsplit", "x0", [0.5, 0.5], [0.3, 0.3]),
            ]
        },
        {
            "site-1": {
                **_labels(0.7, 0.6, 0.6, own=(0.5, 0.5, 0.5)),
                "auc": 0.9,
                "auc_own_image": 0.8,
                "gain_variant": "plain",
                "gain_over_own_image": 0.2,
            }
        },
    )
    later = _report({"site-1": [_inversion("unsplit", "x0", [0.4, 0.6], [0.3, 0.3])]})
    utility = {"difference_to_reference": {"mean": {"mean": -0.112, "low": -0.125, "high": -0.1, "n": 3}}}
    row = {
        "label": "none",
        "activation_bytes_per_iteration": 10e6,
        "utility": utility,
        "train_encoders": True,
        "attacks": {
            "1": {"inversion": pool_inversions(first), "labels": label_summary(first)},
            "40": {"inversion": pool_inversions(later), "labels": label_summary(later)},
        },
        "train_s": 60.0,
        "attack_s": 60.0,
    }
    text = sweep_markdown(
        {"preset": "standard", "iterations": 80, "attack_iterations": [1, 40], "rows": [row], "elapsed_s": 120}
    )
    assert "| none | 10.0 (1.00x) | -11.2 [-12.5, -10.0] | white_box x0 | 0.90 [0.90, 0.90] | 0.30 |" in text
    assert "| +0.60 [+0.60, +0.60] | +0.20 (site-1) |" in text
    assert "0.70 / 0.50 / +0.20; AUC 0.90 (0.80)" in text
    # iteration 40: unsplit, mean 0.5, t(1) = 12.706 x 0.1414 / 1.414 = 1.27
    assert "| none | unsplit x0 | 0.50 [-0.77, 1.77] | +0.20 [-1.07, +1.47] | - |" in text
    assert "Whole sweep: 2 min for 1 runs (1 min training, 1 min attacks" in text


def test_utility_rows_join_by_job_and_arguments_only(tmp_path):
    from splitunet.evaluation.sweep import SweepSetting, _utility_rows

    row = {"label": "float32 (reference)", "job": "split_unet_fp32", "filter_args": {}, "server_args": {}}
    path = tmp_path / "utility.json"
    path.write_text(json.dumps({"rows": [row]}))
    joined = _utility_rows(path)
    assert joined[SweepSetting("no defense", "split_unet_fp32").key()] is not None  # labels may differ
    assert SweepSetting("x", "split_unet_fp32", {"QuantizeFeatures": {}}).key() not in joined
    assert _utility_rows(None) == {}


def test_a_trained_run_is_reused_only_at_the_same_budget_and_under_adamw(tmp_path):
    from splitunet.evaluation.sweep import _trained

    results = tmp_path / "results.json"
    assert _trained(tmp_path, 80) is None
    results.write_text(json.dumps({"iterations": 80, "optimizer": "AdamW"}))
    assert _trained(tmp_path, 80) == {"iterations": 80, "optimizer": "AdamW"}
    assert _trained(tmp_path, 300) is None
    results.write_text(json.dumps({"iterations": 80}))  # recorded before AdamW: trained again
    assert _trained(tmp_path, 80) is None
