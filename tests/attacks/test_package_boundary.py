"""DESIGN.md, 2b: attacks and leakage metrics are plain torch/MONAI, never tied to FLARE, and the training path
never imports them."""

import subprocess
import sys
from pathlib import Path

import splitunet

PACKAGE = Path(splitunet.__file__).parent


def test_attacks_and_metrics_import_without_flare():
    code = (
        "import sys, splitunet.attacks, splitunet.metrics; "
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] == 'nvflare'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_outside_attacks_and_metrics_imports_them():
    leaks = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        if relative[0] in ("attacks", "metrics"):
            continue
        text = path.read_text(encoding="utf-8")
        if "splitunet.attacks" in text or "splitunet.metrics" in text:
            leaks.append(str(path.relative_to(PACKAGE)))
    # The leakage command (cli) is the one intended user outside these packages.
    assert [p for p in leaks if p not in ("cli.py", "leakage.py")] == []
