import importlib
import json

import pytest

from splitunet.evaluation.sweep import DEFAULT_SWEEP, QUICK_SWEEP, sweep_markdown
from splitunet.tools.deployment import copy_job_with_overrides, find_job, job_filters


@pytest.mark.parametrize("setting", DEFAULT_SWEEP, ids=lambda s: s.label)
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
    """The defense a job ships: its sites' filter classes, or its server's (gradient defenses), guards left out."""
    found = {}
    for config_path in find_job(job_name).glob("*/config/*.json"):
        names = {entry["path"].rsplit(".", 1)[-1] for entry in job_filters(json.loads(config_path.read_text()))}
        found[config_path.stem] = sorted(names - {"FeatureGuard"})
    sites, server = found["config_fed_client"], found["config_fed_server"]
    return "+".join(sites) if sites else "+".join(f"{name}@server" for name in server)


def test_two_strengths_of_every_shipped_defense():
    defenses = [_defense(setting.job) for setting in DEFAULT_SWEEP]
    assert defenses[0] == ""  # the baseline comes first
    for defense in set(defenses[1:]):
        assert defenses.count(defense) == 2, defense
    assert len(set(defenses[1:])) == 6  # noise, gradient noise (server side), dropout, top-k, quantize, block
    assert len({setting.label for setting in DEFAULT_SWEEP}) == len(DEFAULT_SWEEP)
    assert all(setting in DEFAULT_SWEEP for setting in QUICK_SWEEP)


def _row(label, dice, inversion, labels=None, megabytes=10.0):
    best = max(inversion, key=lambda r: r["ssim"]) if inversion else None
    return {
        "label": label,
        "dice": {"TC": dice, "WT": dice, "ET": dice},
        "activation_bytes_per_iteration": megabytes * 1e6,
        "inversion": inversion,
        "best_inversion": best,
        "label_inference": labels,
    }


def test_markdown_tables():
    level = {"ssim_prior": 0.3, "psnr_prior": 20.0}
    rows = [
        _row(
            "none",
            0.8,
            [
                {"attack": "white_box", "level": "x0", "ssim": 0.95, "psnr": 40.0, **level},
                {"attack": "white_box", "level": "x1", "ssim": 0.5, "psnr": 24.0, **level},
            ],
            {"dice": 0.7, "dice_random_mask": 0.03, "dice_own_image": 0.72, "gain_over_own_image": -0.02},
        ),
        _row("no x0", 0.7, [{"attack": "white_box", "level": "x1", "ssim": 0.55, "psnr": 25.0, **level}], None, 2.5),
    ]
    text = sweep_markdown(rows, elapsed_s=120)
    first = "| none | 0.800 | 0.800 | 0.800 | +0.000 | 10.0 (1.00x) | white_box x0 | 0.95 (0.30) | 40.0 (20.0) |"
    assert first + " 0.70 (0.72; 0.03) | -0.02 |" in text
    assert (
        "| no x0 | 0.700 | 0.700 | 0.700 | -0.100 | 2.5 (0.25x) | white_box x1 | 0.55 (0.30) | 25.0 (20.0) | - | - |"
        in text
    )
    assert "| no x0 | - | 0.55 / 25.0 |" in text  # x0 column empty: the level was not sent
    assert "Whole sweep: 2 min (2 runs)." in text
