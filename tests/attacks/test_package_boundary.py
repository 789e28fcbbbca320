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


# The evaluation side: the leakage report, the sweep that runs it, and the command line. Nothing here is imported by
# the training path (checked below).
EVALUATION = ("attacks", "metrics", "leakage", "sweep.py", "cli.py")


def test_no_training_module_imports_the_attacks_or_the_evaluation():
    leaks = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        if relative[0] in EVALUATION:
            continue
        text = path.read_text(encoding="utf-8")
        if any(f"splitunet.{name}" in text for name in ("attacks", "metrics", "leakage", "sweep")):
            leaks.append(str(path.relative_to(PACKAGE)))
    assert leaks == []
