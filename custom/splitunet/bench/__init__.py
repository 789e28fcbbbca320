"""``splitunet bench``: step time, bytes on the wire and Dice of Split-U-Net vs centralized and single modalities.

One module per concept: :mod:`~splitunet.bench.settings` (what is measured), :mod:`~splitunet.bench.timing`,
:mod:`~splitunet.bench.wire` (encoding, host staging, serialization in one process), the arms
(:mod:`~splitunet.bench.centralized`, :mod:`~splitunet.bench.split_inprocess`, :mod:`~splitunet.bench.flare_runs`),
:mod:`~splitunet.bench.wire_bytes`, :mod:`~splitunet.bench.loopback`, :mod:`~splitunet.bench.accuracy`,
:mod:`~splitunet.bench.targets` and :mod:`~splitunet.bench.report`. Nothing here imports nvflare at module level:
with ``--no-flare`` the benchmark runs where FLARE is not installed.
"""

from __future__ import annotations

from splitunet.bench.runner import failed_paths, run_bench
from splitunet.bench.settings import BenchSettings, ProblemSize

__all__ = ["BenchSettings", "ProblemSize", "run_bench", "failed_paths"]
