"""`splitunet sweep --quick`: a tiny run in the FLARE simulator, every site attacked at the first, middle and last
iteration, Dice joined from a utility report."""

import json

import pytest

from splitunet.tools.cli import main

pytestmark = pytest.mark.e2e

# A utility report with one measured setting: the sweep's "no defense" run (same job and arguments).
_UTILITY_ROW = {
    "label": "float32 (reference)",
    "job": "split_unet_fp32",
    "filter_args": {},
    "server_args": {},
    "dice_mean": {"TC": 0.9, "WT": 0.9, "ET": 0.9},
    "difference_to_reference": {"mean": {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 3}},
}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    utility = out / "utility.json"
    utility.write_text(json.dumps({"rows": [_UTILITY_ROW]}))
    assert main(["sweep", "--quick", "--out", str(out), "--utility", str(utility)]) == 0
    return out


def _summary(sweep_dir):
    return json.loads((sweep_dir / "sweep.json").read_text())


def test_every_site_attacked_at_first_middle_and_last_iteration(sweep_dir):
    summary = _summary(sweep_dir)
    assert summary["attack_iterations"] == [1, 2, 4]
    for row in summary["rows"]:
        assert sorted(row["attacks"]) == ["1", "2", "4"]
        for iteration, attacked in row["attacks"].items():
            assert (sweep_dir / attacked["report"]).is_file()
            names = {entry["attack"] for entry in attacked["inversion"]}
            # White-box needs the encoder as initialised: only the first iteration.
            assert ("white_box" in names) == (iteration == "1")
            assert {"unsplit", "substitute_encoder"} <= names
            for entry in attacked["inversion"]:
                assert entry["crops"] == 8  # 4 sites x batch 2, pooled
                assert len(entry["sites"]) == 4
                ssim = entry["ssim_brain"]
                assert ssim["low"] <= ssim["mean"] <= ssim["high"]
                assert -1 <= ssim["mean"] <= 1
        # Gradients for iterations 1 and 2 were captured (with 2 and 3); none follow the last.
        assert len(row["attacks"]["1"]["labels"]["by_site"]) == 4
        assert len(row["attacks"]["2"]["labels"]["by_site"]) == 4
        assert row["attacks"]["4"]["labels"]["by_site"] == {}


def test_dice_comes_from_the_utility_report_and_the_tables_are_written(sweep_dir):
    (baseline,) = _summary(sweep_dir)["rows"]
    assert baseline["utility"]["label"] == "float32 (reference)"
    text = (sweep_dir / "sweep.md").read_text()
    assert "| no defense | 37" not in text  # the quick model is far smaller than the demo's
    assert "| no defense |" in text and "| +0.0 [+0.0, +0.0] |" in text
    assert "white_box adaptive" in text and "Later iterations" in text
    assert (sweep_dir / "tradeoff.png").stat().st_size > 0
