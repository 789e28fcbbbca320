"""`splitunet sweep --quick`: two tiny runs in the FLARE simulator (no defense, x0 withheld), each attacked."""

import json

import pytest

from splitunet.tools.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert main(["sweep", "--quick", "--out", str(out)]) == 0
    return out


def test_table_plot_and_one_report_per_run(sweep_dir):
    rows = json.loads((sweep_dir / "sweep.json").read_text())["rows"]
    assert [row["label"] for row in rows] == ["no defense", "x0 withheld"]
    assert (sweep_dir / "tradeoff.png").stat().st_size > 0
    assert "| no defense |" in (sweep_dir / "sweep.md").read_text()
    for row in rows:
        assert row["iterations"] == 4
        assert (sweep_dir / row["report"]).is_file()
        assert row["label_inference"] is not None
        for result in row["inversion"]:
            assert 0 < result["psnr"] < 100 and -1 <= result["ssim"] <= 1


def test_withholding_x0_shows_in_what_the_server_received(sweep_dir):
    baseline, no_x0 = json.loads((sweep_dir / "sweep.json").read_text())["rows"]
    assert baseline["levels_received"] == ["x0", "x1", "x2", "x3", "x4"]
    assert no_x0["levels_received"] == ["x1", "x2", "x3", "x4"]
    assert not any(result["level"] == "x0" for result in no_x0["inversion"])
    assert no_x0["label_inference"]["level"] == "x1"  # the gradients of x0 are not sent either
    assert no_x0["activation_bytes_per_iteration"] < 0.5 * baseline["activation_bytes_per_iteration"]
