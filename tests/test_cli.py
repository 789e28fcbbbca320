"""cli: the splitunet command's subcommands and errors."""

from __future__ import annotations

import json
import subprocess
import sys

from splitunet.cli import main


def test_python_dash_m_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "splitunet", "--help"], capture_output=True, text=True, check=True)
    for command in ("phantom", "partition", "prepare", "stage-byoc", "demo"):
        assert command in result.stdout


def test_phantom_then_partition(tmp_path, capsys):
    assert (
        main(["phantom", "--out", str(tmp_path / "msd"), "--cases", "2", "--shape", "32", "32", "32", "--quiet"]) == 0
    )
    assert json.loads((tmp_path / "msd" / "dataset.json").read_text())["numTraining"] == 2
    assert main(["partition", "--src", str(tmp_path / "msd"), "--out", str(tmp_path / "parties"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "parties").iterdir()) == ["flair", "labels", "t1", "t1gd", "t2"]


def test_data_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["partition", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_leakage_attack_choices_match_the_package():
    from splitunet.cli import ATTACKS
    from splitunet.leakage import ATTACK_CHOICES

    assert ATTACKS == ATTACK_CHOICES
