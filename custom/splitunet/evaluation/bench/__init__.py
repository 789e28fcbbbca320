"""``splitunet bench``: step time, bytes on the wire and Dice of Split-U-Net vs centralized and single modalities.

One module per concept: ``settings`` (what is measured), ``timing``, ``wire`` (encoding, host staging,
serialization in one process), the arms (``centralized``, ``split_inprocess``, ``flare_runs``), ``wire_bytes``,
``loopback``, ``accuracy``, ``targets`` and ``report``. Nothing here imports nvflare at module level: with
``--no-flare`` the benchmark runs where FLARE is not installed.
"""

from __future__ import annotations

from splitunet.evaluation.bench.runner import failed_paths, run_bench
from splitunet.evaluation.bench.settings import BenchSettings, ProblemSize

__all__ = ["BenchSettings", "ProblemSize", "run_bench", "failed_paths"]
