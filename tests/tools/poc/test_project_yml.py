"""poc/project.yml provisions the consortium the deployment guide describes (docs/deployment.md)."""

import subprocess
import sys

import yaml

from splitunet.tools.deployment import bundle_root


def test_provisions_a_server_an_admin_and_four_sites(tmp_path):
    project_file = bundle_root() / "poc" / "project.yml"
    project = yaml.safe_load(project_file.read_text())
    sites = [p["name"] for p in project["participants"] if p["type"] == "client"]
    assert sites == ["site-1", "site-2", "site-3", "site-4"]
    command = [sys.executable, "-m", "nvflare.cli", "provision", "-p", str(project_file), "-w", str(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    kits = tmp_path / project["name"] / "prod_00"
    for party in ["fl-server.example.org", "admin@coordinating-centre.example.org", *sites]:
        assert (kits / party / "startup").is_dir(), party
    assert (kits / "site-1" / "startup" / "client.key").is_file()  # each kit holds its own private key only
    assert not (kits / "site-1" / "startup" / "server.key").exists()
