"""FLARE's transport alone, at a split step's payload: which tensor settings move it fastest.

A step's time in FLARE mixes compute, the filters' encoding, serialization and messaging. This arm keeps only the
last two: a workflow (:class:`TransportEchoController`) sends every site a task holding exactly the tensors of one
step's int8 gradients (codes and per-channel scales of every sent level, random, fresh each round) and each site
(:class:`TransportEchoExecutor`) answers with fresh tensors of the same layout, as its features would be. Nothing is
computed, filtered or decoded. Each setting of :data:`TRANSPORT_VARIANTS` is one simulator run of the same rounds:

- FLARE's tensor download chunk (``tensor_download_chunk_size``, a job config variable of nvflare 2.9's
  ``TensorDecomposer``; 2 MiB by default; 0 sends the tensors inline in the message instead of through the
  downloader);
- one tensor per level and scale, as the job sends, or the whole message packed into one ``uint8`` buffer.

The workflow times each round from scheduling the tasks to the last reply, and the sites time their own part, so
that FLARE's share is what is left. The first ``warmup_rounds`` are left out of the means.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitunet.evaluation.bench.job_defaults import job_training_args, main_job_dir
from splitunet.evaluation.bench.settings import ProblemSize

__all__ = [
    "TransportVariant",
    "TRANSPORT_VARIANTS",
    "TRANSPORT_TASK",
    "TRANSPORT_RESULTS",
    "step_layout",
    "make_payload",
    "payload_bytes",
    "message_bytes",
    "SITE_SECONDS_HEADER",
    "run_transport_variant",
    "run_transport",
    "transport_markdown",
]

TRANSPORT_TASK = "transport_echo"
TRANSPORT_RESULTS = "transport.json"
# The sites' reply time, in the result's headers.
SITE_SECONDS_HEADER = "transport_site_s"
ECHO_CLASSES = ("TransportEchoController", "TransportEchoExecutor")


@dataclass(frozen=True)
class TransportVariant:
    """One transport setting.

    Attributes:
        name: label in the report.
        chunk_bytes: ``tensor_download_chunk_size``; ``None`` leaves FLARE's default (2 MiB), 0 sends inline.
        packed: one ``uint8`` buffer per message instead of a tensor per level and scale.
    """

    name: str
    chunk_bytes: int | None = None
    packed: bool = False

    def config_vars(self) -> dict:
        """The job config variables this setting sets (server and sites alike)."""
        return {} if self.chunk_bytes is None else {"tensor_download_chunk_size": int(self.chunk_bytes)}


TRANSPORT_VARIANTS = (
    TransportVariant("a tensor per level, 2 MiB chunks (FLARE's default, the job's)"),
    TransportVariant("a tensor per level, 8 MiB chunks", chunk_bytes=8 * 1024 * 1024),
    TransportVariant("a tensor per level, 32 MiB chunks", chunk_bytes=32 * 1024 * 1024),
    TransportVariant("a tensor per level, inline (no downloader)", chunk_bytes=0),
    TransportVariant("one packed buffer, 2 MiB chunks", packed=True),
    TransportVariant("one packed buffer, 32 MiB chunks", chunk_bytes=32 * 1024 * 1024, packed=True),
)


def step_layout(problem: ProblemSize) -> dict[str, list[int]]:
    """Name -> shape of every tensor one site's int8 message of ``problem`` holds: per sent level its ``uint8`` codes
    ``(B, C, D, H, W)`` and two ``float32`` per-channel scales ``(B, C)`` (the affine codec's low and step)."""
    layout = {}
    for level in sorted({*problem.skip_levels, 4}):
        channels = problem.features[level]
        size = [s // 2**level for s in problem.crop_size]
        layout[f"x{level}"] = [problem.batch_size, channels, *size]
        layout[f"x{level}_low"] = [problem.batch_size, channels]
        layout[f"x{level}_step"] = [problem.batch_size, channels]
    return layout


def _is_scale(name: str) -> bool:
    return name.endswith(("_low", "_step"))


def payload_bytes(layout: Mapping[str, Sequence[int]]) -> int:
    """Bytes of one message of ``layout`` (codes one byte, scales four)."""
    return sum(math.prod(shape) * (4 if _is_scale(name) else 1) for name, shape in layout.items())


def make_payload(layout: Mapping[str, Sequence[int]], packed: bool, generator: torch.Generator) -> dict:
    """Fresh random tensors of ``layout`` (or, ``packed``, one ``uint8`` buffer of the same bytes)."""
    if packed:
        return {"packed": torch.randint(0, 256, (payload_bytes(layout),), dtype=torch.uint8, generator=generator)}
    return {
        name: torch.rand(*shape, generator=generator)
        if _is_scale(name)
        else torch.randint(0, 256, tuple(shape), dtype=torch.uint8, generator=generator)
        for name, shape in layout.items()
    }


def message_bytes(data: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a message's tensors (headers aside)."""
    return sum(t.numel() * t.element_size() for t in data.values())


def _main_job_messaging() -> tuple[dict, dict, float]:
    """The main job's messaging settings (the server's and sites' task polling, the workflow's long poll), so the
    echo hands its tasks out as a split step does."""
    config = main_job_dir() / "app" / "config"
    server = json.loads((config / "config_fed_server.json").read_text())
    client = json.loads((config / "config_fed_client.json").read_text())
    server_vars = {key: server[key] for key in ("server",) if key in server}
    client_vars = {key: client[key] for key in ("default_task_fetch_interval",) if key in client}
    return server_vars, client_vars, float(job_training_args().get("task_long_poll_s", 0.0))


def _export_job(job_root: Path, variant: TransportVariant, layout: dict, sites: int, rounds: int, warmup: int) -> Path:
    """The echo job for ``variant``, written with FLARE's Job API; returns its folder."""
    from nvflare.job_config.api import FedJob

    from splitunet.evaluation.bench.transport_echo import TransportEchoController, TransportEchoExecutor

    server_vars, client_vars, long_poll_s = _main_job_messaging()
    job = FedJob(name="transport_echo", min_clients=sites)
    controller = TransportEchoController(
        layout=layout, packed=variant.packed, rounds=rounds, warmup_rounds=warmup, long_poll_s=long_poll_s
    )
    job.to_server(controller)
    job.to_clients(TransportEchoExecutor(), tasks=[TRANSPORT_TASK])
    job.to_server({**server_vars, **variant.config_vars()})
    job.to_clients({**client_vars, **variant.config_vars()})
    job.export_job(str(job_root))
    # The Job API copies the source of the components' package modules into the app; the installed bundle serves
    # them (as for the bundle's own jobs), and a partial copy of the package must not sit beside it.
    shutil.rmtree(job_root / "transport_echo" / "app" / "custom", ignore_errors=True)
    return job_root / "transport_echo"


def _allow_echo_classes(local_dir: Path) -> None:
    """FLARE's default class allow-list plus the echo's two classes, for this benchmark's own simulator workspace
    (the simulator copies ``<workspace>/local`` into every party); the bundle's workspaces never allow them."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local_dir.mkdir(parents=True, exist_ok=True)
    echo = [f"splitunet.evaluation.bench.transport_echo.{name}" for name in ECHO_CLASSES]
    resources = {"class_allow_list": [*DEFAULT_CLASS_ALLOW_LIST, *echo]}
    (local_dir / "resources.json").write_text(json.dumps(resources, indent=2))


def _summary(rounds: Sequence[Mapping]) -> dict:
    timed = [r for r in rounds if not r["warmup"]]
    if not timed:
        return {}
    seconds = [r["seconds"] for r in timed]
    moved = statistics.mean(r["bytes_down"] + r["bytes_up"] for r in timed)
    flare_s = [r["seconds"] - r["site_s"] for r in timed]
    return {
        "timed_rounds": len(timed),
        "seconds_mean": statistics.mean(seconds),
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
        "site_s_mean": statistics.mean(r["site_s"] for r in timed),
        "hand_out_s_mean": statistics.mean(r["hand_out_s"] for r in timed),
        "bytes_per_round": moved,
        # What FLARE moved per second of its own share of the round (the sites' answer time taken out).
        "mb_per_s": moved / 1e6 / statistics.mean(flare_s),
    }


def _pooled(variant: TransportVariant, runs: Sequence[Mapping]) -> dict:
    """One variant's runs together: the first error, and the summary of every run's rounds."""
    errors = [run["error"] for run in runs if run.get("error")]
    rounds = [r for run in runs for r in run.get("rounds", [])]
    return {
        **asdict(variant),
        "error": errors[0] if errors else None,
        "runs": len(runs),
        "elapsed_s": sum(run["elapsed_s"] for run in runs),
        "rounds": rounds,
        **(_summary(rounds) if not errors else {}),
    }


def run_transport_variant(
    out_dir: Path,
    variant: TransportVariant,
    layout: dict,
    sites: int = 4,
    rounds: int = 3,
    warmup: int = 1,
    timeout_s: float = 1800.0,
) -> dict:
    """One simulator run of the echo job under ``variant``; its rounds and their summary."""
    from splitunet.tools.simulator import find_run_file, run_simulator

    out_dir = Path(out_dir)
    job_dir = _export_job(out_dir / "job", variant, layout, sites, rounds, warmup)
    workspace = out_dir / "workspace"
    _allow_echo_classes(workspace / "local")
    clients = [f"site-{index + 1}" for index in range(sites)]
    start = time.perf_counter()
    code = run_simulator(job_dir, workspace, clients, out_dir / "simulator.log", timeout_s=timeout_s, echo=False)
    elapsed = time.perf_counter() - start
    found = find_run_file(workspace, "server", TRANSPORT_RESULTS)
    if found is None:
        return {
            **asdict(variant),
            "error": f"no {TRANSPORT_RESULTS} (simulator exit code {code})",
            "elapsed_s": elapsed,
        }
    results = json.loads(found.read_text())
    return {
        **asdict(variant),
        "error": results["error"],
        "elapsed_s": elapsed,
        "rounds": results["rounds"],
        **_summary(results["rounds"]),
    }


def run_transport(
    out_dir: str | Path,
    problem: ProblemSize,
    variants: Sequence[TransportVariant] = TRANSPORT_VARIANTS,
    sites: int = 4,
    rounds: int = 3,
    warmup: int = 1,
    timeout_s: float = 1800.0,
    command: str = "",
    repeats: int = 1,
) -> dict:
    """Every variant in turn at ``problem``'s int8 step payload; writes ``transport.json`` and ``transport.md``.

    With ``repeats`` above 1 the whole sequence of variants runs that many times (A B C, A B C, ...), so that a
    change in the machine's load between runs falls on every variant alike; each variant's timed rounds are pooled.
    """
    out_dir = Path(out_dir)
    layout = step_layout(problem)
    load_before = os.getloadavg()[0]
    runs_by_variant: list[list[dict]] = [[] for _ in variants]
    for repeat in range(repeats):
        for index, variant in enumerate(variants):
            print(f"transport {repeat + 1}.{index + 1}/{repeats}.{len(variants)}: {variant.name}", flush=True)
            folder = out_dir / f"variant_{index}" / f"run_{repeat}"
            run = run_transport_variant(folder, variant, layout, sites, rounds, warmup, timeout_s)
            runs_by_variant[index].append(run)
    runs = [_pooled(variant, variant_runs) for variant, variant_runs in zip(variants, runs_by_variant)]
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "problem": problem.to_dict(),
        "sites": sites,
        "repeats": repeats,
        "message_bytes": payload_bytes(layout),
        "cpus": os.cpu_count(),
        # Other work on the machine slows every setting; the 1-minute load average says how busy it was.
        "load_average": [load_before, os.getloadavg()[0]],
        "variants": runs,
    }
    (out_dir / "transport.json").write_text(json.dumps(report, indent=2))
    (out_dir / "transport.md").write_text(transport_markdown(report))
    return report


def transport_markdown(report: Mapping) -> str:
    """The report as a Markdown table, fastest setting marked."""
    problem = report["problem"]
    load = report.get("load_average") or [float("nan")] * 2
    crop = "x".join(str(s) for s in problem["crop_size"])
    lines = [
        f"# FLARE transport at the {crop} int8 step's payload",
        "",
        f"`{report['command'] or 'splitunet bench --transport'}`, {report['date']}. {report['sites']} sites, "
        f"{report.get('repeats', 1)} run(s) of every setting in turn; each "
        f"round sends every site {report['message_bytes'] / 1e6:.1f} MB and takes as much back (codes and scales of "
        "every sent level, random); nothing is computed or filtered. Seconds from scheduling the tasks to the last "
        "reply; MB/s: bytes both ways over the round minus the slowest site's own time.",
        "",
        f"Machine: {report.get('cpus')} CPUs, 1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at "
        "the end.",
        "",
        "| setting | seconds per round (mean, min-max) | site's own time | hand-out | MB/s | error |",
        "|---|---|---|---|---|---|",
    ]
    finished = [v for v in report["variants"] if v.get("seconds_mean") is not None]
    best = min(finished, key=lambda v: v["seconds_mean"])["name"] if finished else None
    for variant in report["variants"]:
        if variant.get("seconds_mean") is None:
            lines.append(f"| {variant['name']} | - | - | - | - | {variant.get('error') or 'no timed round'} |")
            continue
        name = f"**{variant['name']}**" if variant["name"] == best else variant["name"]
        lines.append(
            f"| {name} | {variant['seconds_mean']:.2f} ({variant['seconds_min']:.2f}-{variant['seconds_max']:.2f}) | "
            f"{variant['site_s_mean']:.2f} | {variant['hand_out_s_mean']:.2f} | {variant['mb_per_s']:.0f} | "
            f"{variant.get('error') or ''} |"
        )
    return "\n".join(lines) + "\n"
