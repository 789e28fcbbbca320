"""What a finished run left for leakage evaluation: the server's captures, the sites, the model settings."""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from splitunet.checkpoint import load_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.attacks import observed_from_capture
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import DataKind

__all__ = ["Capture", "CapturedRun", "ACTIVATIONS", "GRADIENTS"]

# The DXO data kinds CaptureFeatures files its records under (``<captures>/<kind>/<site>/iteration_<n>.pt``).
ACTIVATIONS = DataKind.ACTIVATIONS
GRADIENTS = DataKind.GRADIENTS
_ITERATION_FILE = re.compile(r"iteration_(\d+)\.pt$")


@dataclass(frozen=True)
class Capture:
    """One captured record: the observed tensors per level and the crop plan they belong to.

    Args:
        site: the site whose features (or gradients) these are.
        kind: :data:`ACTIVATIONS` (as the server received them) or :data:`GRADIENTS` (as the server sent them).
        iteration: the training iteration of the DXO that carried them.
        observed: level index -> ``(B, C, D, H, W)`` float32 tensor.
        plan: the crop plan carried with the DXO (keys, origins, size, flips).
        filter_trail: what every filter on the way did (settings included).
        path: the capture file.
    """

    site: str
    kind: str
    iteration: int
    observed: dict[int, torch.Tensor]
    plan: dict | None
    filter_trail: list
    path: Path


class CapturedRun:
    """A ``splitunet demo --capture`` (or ``splitunet sweep``) workspace, read back for attacks.

    The workspace's ``results.json`` names the server's run folder, whose ``captures/`` holds what
    ``CaptureFeatures`` recorded, and the server's own ``results.json`` holds the model settings the sites built
    their encoders from.

    Args:
        workspace: the folder given to ``splitunet demo --workspace``.

    Raises:
        SplitUNetConfigError: no results, or a run without captures (the message says how to make them).
    """

    def __init__(self, workspace: str | Path):
        self.workspace = Path(workspace).resolve()
        summary_path = self.workspace / "results.json"
        if not summary_path.is_file():
            raise SplitUNetConfigError(f"{summary_path} not found: give the workspace of a `splitunet demo` run")
        self.summary = json.loads(summary_path.read_text())
        server_results = Path(self.summary.get("server_results", ""))
        if not server_results.is_file():
            raise SplitUNetConfigError(f"{summary_path} names no server results file that exists: {server_results}")
        self.server_results = json.loads(server_results.read_text())
        self.run_dir = server_results.parent
        self.captures_dir = self.run_dir / "captures"
        if not self.captures_dir.is_dir():
            raise SplitUNetConfigError(
                f"the run in {self.workspace} captured nothing ({self.captures_dir} is absent); rerun it with "
                "`splitunet demo --capture 1 2 ...`"
            )
        self.sites: dict[str, str] = dict(self.summary.get("sites") or self.server_results["sites"])
        self.model = SplitModelConfig.from_dict(self.server_results["model"])
        self.job = self.summary.get("job", "")

    def iterations(self, kind: str, site: str) -> list[int]:
        """Captured iterations of one kind and site, sorted."""
        folder = self.captures_dir / kind / site
        found = (_ITERATION_FILE.search(path.name) for path in folder.glob("iteration_*.pt"))
        return sorted(int(match.group(1)) for match in found if match)

    def capture(self, kind: str, site: str, iteration: int) -> Capture:
        """Load one capture.

        Raises:
            SplitUNetConfigError: the file is absent (naming the iterations that were captured) or unreadable.
        """
        if site not in self.sites:
            raise SplitUNetConfigError(f"site {site!r} is not in this run (sites: {sorted(self.sites)})")
        path = self.captures_dir / kind / site / f"iteration_{int(iteration):06d}.pt"
        if not path.is_file():
            raise SplitUNetConfigError(
                f"no {kind} capture of {site} at iteration {iteration} in {self.captures_dir} "
                f"(captured: {self.iterations(kind, site) or 'none'})"
            )
        try:
            record = load_checkpoint(path)
            observed, plan = observed_from_capture(record)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
            raise SplitUNetConfigError(f"capture {path} is unreadable: {error}") from error
        return Capture(site, kind, int(iteration), observed, plan, list(record.get("filter_trail") or []), path)
