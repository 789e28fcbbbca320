"""docs/design.md, "Boundaries": attacks and leakage metrics are plain torch/MONAI, never tied to FLARE, and the
training path never imports them."""

import subprocess
import sys
from pathlib import Path

import splitunet

PACKAGE = Path(splitunet.__file__).parent


def test_attacks_and_metrics_import_without_flare():
    code = (
        "import sys, splitunet.evaluation.attacks, splitunet.evaluation.metrics; "
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] == 'nvflare'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# The evaluation side (attacks, metrics, leakage, sweep, bench) and the operator tools that run it (the command
# line, the demo). Nothing here is imported by the training path (checked below).
EVALUATION = ("evaluation", "tools")


def test_no_training_module_imports_the_attacks_or_the_evaluation():
    leaks = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        if relative[0] in EVALUATION:
            continue
        text = path.read_text(encoding="utf-8")
        if "splitunet.evaluation" in text:
            leaks.append(str(path.relative_to(PACKAGE)))
    assert leaks == []
