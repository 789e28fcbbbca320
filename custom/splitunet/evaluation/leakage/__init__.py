"""Leakage evaluation of finished runs: attacks on the server's captures, scored against the truth.

Never imported by the training path (docs/design.md, "Boundaries"); it reads what the opt-in ``CaptureFeatures``
filter saved.
"""

from splitunet.evaluation.leakage.attack_suite import (
    INVERSION_ATTACKS,
    AttackBudget,
    infer_labels,
    invert_capture,
    level_name,
)
from splitunet.evaluation.leakage.captured_run import ACTIVATIONS, GRADIENTS, Capture, CapturedRun
from splitunet.evaluation.leakage.figures import plot_reconstruction_grid, plot_tradeoff
from splitunet.evaluation.leakage.ground_truth import AuxiliaryImages, GroundTruth
from splitunet.evaluation.leakage.report import ATTACK_CHOICES, best_inversion, leakage_markdown, run_leakage

__all__ = [
    "INVERSION_ATTACKS",
    "AttackBudget",
    "infer_labels",
    "invert_capture",
    "level_name",
    "ACTIVATIONS",
    "GRADIENTS",
    "Capture",
    "CapturedRun",
    "plot_reconstruction_grid",
    "plot_tradeoff",
    "AuxiliaryImages",
    "GroundTruth",
    "ATTACK_CHOICES",
    "best_inversion",
    "leakage_markdown",
    "run_leakage",
]
