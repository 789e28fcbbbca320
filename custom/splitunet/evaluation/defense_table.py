"""``splitunet defenses``: train the demo configuration once per shipped defense and tabulate what each costs.

Every run uses the same phantom cases and case-key secret (so the same training and validation cases), so the
Dice differences are the defenses' doing, up to the run-to-run variation of the random defenses themselves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.tools.demo import DemoSettings, run_demo
from splitunet.tools.deployment import bundle_root, job_filters
from splitunet.tools.jobs import defense_jobs

__all__ = ["DEFENSE_JOBS", "run_defense_table", "defense_table_markdown", "mean_dice", "cost_cells"]

# The jobs marked as defenses in the job description, in its order: the float32 reference first (the baseline every
# other row is compared with); the main job, int8 on the wire both ways, is a row like the others.
DEFENSE_JOBS = defense_jobs()


def _filters_used(job_dir: Path) -> dict[str, list[str]]:
    """Defense filters (guards left out) per side of a job folder: ``{"sites": [...], "server": [...]}``."""
    used = {"sites": [], "server": []}
    for side, name in (("sites", "config_fed_client.json"), ("server", "config_fed_server.json")):
        for config_path in job_dir.glob(f"*/config/{name}"):
            for entry in job_filters(json.loads(config_path.read_text())):
                class_name = entry.get("path", "").rsplit(".", 1)[-1]
                if class_name != "FeatureGuard":
                    args = ", ".join(f"{k}={v}" for k, v in entry.get("args", {}).items() if k != "clip_norm")
                    used[side].append(f"{class_name}({args})")
    return used


def run_defense_table(
    out_dir: str | Path,
    jobs: Sequence[str] = DEFENSE_JOBS,
    settings: DemoSettings | None = None,
) -> list[dict]:
    """Run each job on shared phantom data in the simulator; write ``defenses.json`` and ``defenses.md``.

    Returns:
        one row per job.
    """
    out_dir = Path(out_dir).resolve()
    data_dir = out_dir / "data"
    rows = []
    for name in jobs:
        job_dir = Path(name) if Path(name).is_dir() else bundle_root() / "jobs" / name
        print(f"\n=== {job_dir.name} ===", flush=True)
        summary = run_demo(out_dir / job_dir.name, settings, job_dir=job_dir, data_dir=data_dir)
        rows.append(
            {
                "job": job_dir.name,
                "filters": _filters_used(job_dir),
                "dice": summary["dice"],
                "iterations": summary["iterations"],
                "activation_bytes_per_iteration": summary.get("activation_bytes_per_iteration"),
                "elapsed_s": summary["elapsed_s"],
                "results": str(out_dir / job_dir.name / "results.json"),
            }
        )
        write_json_atomic({"rows": rows}, out_dir / "defenses.json")
    (out_dir / "defenses.md").write_text(defense_table_markdown(rows))
    return rows


def mean_dice(dice: Mapping[str, float]) -> float:
    """Mean of the TC/WT/ET Dice values that are finite (NaN if none is)."""
    values = [dice[r] for r in ("TC", "WT", "ET") if dice.get(r) is not None and math.isfinite(dice[r])]
    return sum(values) / len(values) if values else math.nan


def cost_cells(row: Mapping, first: Mapping, megabyte_digits: int = 2) -> str:
    """``Dice TC | WT | ET | mean Dice vs first | activation MB (ratio)`` cells of a table row, against ``first``."""
    dice = row["dice"]
    megabytes = row.get("activation_bytes_per_iteration") or 0
    base_bytes = first.get("activation_bytes_per_iteration")
    ratio = f" ({megabytes / base_bytes:.2f}x)" if megabytes and base_bytes else ""
    return (
        f"{dice['TC']:.3f} | {dice['WT']:.3f} | {dice['ET']:.3f} | {mean_dice(dice) - mean_dice(first['dice']):+.3f} | "
        f"{megabytes / 1e6:.{megabyte_digits}f}{ratio}"
    )


def defense_table_markdown(rows: Sequence[Mapping]) -> str:
    """Markdown table of :func:`run_defense_table` rows; Dice differences are against the first row."""
    lines = [
        "| job | defense at sites | defense at server | Dice TC | Dice WT | Dice ET | mean Dice vs first row "
        "| activation MB / iteration (4 sites) | run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['job']} | {'; '.join(row['filters']['sites']) or '-'} | "
            f"{'; '.join(row['filters']['server']) or '-'} | {cost_cells(row, rows[0])} | {row['elapsed_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
