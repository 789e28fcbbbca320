"""cli: the splitunet command's subcommands and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitunet.tools.cli import main


def test_python_dash_m_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "splitunet", "--help"], capture_output=True, text=True, check=True)
    for command in ("phantom", "partition", "prepare", "stage-byoc", "demo", "jobs", "leakage", "bench"):
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
    from splitunet.evaluation.leakage import ATTACK_CHOICES
    from splitunet.tools.cli import ATTACKS

    assert ATTACKS == ATTACK_CHOICES


def test_prepare_and_configure_kit_name_checkpoint_dirs(tmp_path, capsys, monkeypatch):
    from splitunet.data.party_settings import load_server_settings, load_site_settings

    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    workspace, checkpoints = tmp_path / "ws", tmp_path / "ckpt"
    command = ["prepare", "--data", str(tmp_path / "parties"), "--workspace", str(workspace), "--layout", "msd"]
    assert main([*command, "--checkpoint-dir", str(checkpoints)]) == 0
    assert load_site_settings("site-2", workspace / "local").checkpoint_dir == checkpoints.resolve() / "site-2"
    assert load_server_settings("simulator_server", workspace / "local").checkpoint_dir == checkpoints / "server"

    kit = tmp_path / "site-1"
    (kit / "startup").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    site = ["--modality", "flair", "--data", str(tmp_path / "flair"), "--case-key-secret-file", str(secret)]
    options = ["--checkpoint-dir", str(tmp_path / "keep"), "--inference-dir", str(tmp_path / "new")]
    assert main(["configure-kit", "--kit", str(kit), *site, *options]) == 0
    settings = load_site_settings("site-1", kit / "local")
    assert (settings.checkpoint_dir, settings.inference_dir) == (tmp_path / "keep", tmp_path / "new")


def test_compare_passes_seeds_budget_and_earlier_files_to_the_study(tmp_path, monkeypatch, capsys):
    from splitunet.evaluation import compare

    calls = []

    def fake_run_compare(out_dir, settings, reuse=None):
        calls.append(
            (settings.seeds, settings.topologies, reuse, settings.steps, settings.rounds, settings.curve_every)
            + (settings.timeout_s,)
        )
        (out_dir / "compare.md").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.md").write_text("the table\n")

    monkeypatch.setattr(compare, "run_compare", fake_run_compare)
    argv = ["compare", "--out", str(tmp_path / "c"), "--quick", "--topologies", "fedavg", "fedavg_dp_eps1"]
    assert main([*argv, "--only-seeds", "2", "--reuse", "a.json", "b.json"]) == 0
    assert main(argv) == 0
    assert main([*argv, "--steps", "8", "--rounds", "4", "--curve-every", "4", "--timeout-min", "90"]) == 0
    assert calls[0][0] == (2,) and calls[0][1] == ("fedavg", "fedavg_dp_eps1")
    assert [str(path) for path in calls[0][2]] == ["a.json", "b.json"]
    assert calls[1][0] == (0, 1, 2) and calls[1][2] is None
    # The quick budget, no curve, the quick limit; then what was asked for.
    assert calls[1][3:] == (4, 2, 0, 600.0) and calls[2][3:] == (8, 4, 4, 5400.0)
    assert "the table" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: one way of naming the seeds
        main([*argv, "--seeds", "2", "--only-seeds", "1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_simulator_passes_every_argument_to_flare_with_the_launch_guard_on(capsys):
    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

    with pytest.raises(SystemExit) as stopped:
        main(["simulator", "--help"])  # FLARE's own option, not ours
    assert stopped.value.code == 0
    assert "usage: nvflare simulator" in capsys.readouterr().out
    assert getattr(SimulatorClientRunner._create_connection, "_splitunet_launch_guarded", False)
