"""``splitunet bench``: every measurement of the benchmark, in one run on one machine, into one report."""

from __future__ import annotations

import time
from collections.abc import Callable

from splitunet.atomic_files import write_json_atomic
from splitunet.compute.devices import configure_threads
from splitunet.evaluation.bench.accuracy import train_and_validate
from splitunet.evaluation.bench.flare_runs import run_poc_path, run_simulator_path
from splitunet.evaluation.bench.links import run_link_paths
from splitunet.evaluation.bench.loopback import loopback_tcp_copy
from splitunet.evaluation.bench.machine import describe_machine
from splitunet.evaluation.bench.phantom_data import prepare_bench_data
from splitunet.evaluation.bench.report import write_report
from splitunet.evaluation.bench.serialization import FeatureSerializer
from splitunet.evaluation.bench.settings import BenchSettings
from splitunet.evaluation.bench.step_timing import time_problem_size
from splitunet.evaluation.bench.targets import evaluate_targets

__all__ = ["run_bench", "failed_paths"]


def _log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def _flare_path(name: str, enabled: bool, skipped_because: str, run: Callable[[], dict]) -> dict:
    if not enabled:
        return {"skipped": skipped_because}
    _log(f"FLARE {name}")
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - a failed FLARE path must not lose the other measurements
        _log(f"FLARE {name} failed: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {error}"}


def _skip_reason(settings: BenchSettings, path: str) -> str:
    if not settings.run_simulator:
        return "not run (--no-flare)"
    if path == "poc" and settings.quick:
        return "not run (--quick: POC start-up alone outlasts the quick budget)"
    return "not run (--no-poc)"


def _throughput(report: dict, reference_table: dict, default_precision: str, repeats: int) -> dict:
    """MB/s of each FLARE path's waiting/transfer part, and of a raw loopback copy of the same bytes."""
    down = reference_table["total"]["down"].get(default_precision, reference_table["total"]["down"]["float32"])
    throughput = {}
    moved = reference_table["total"]["both"].get(default_precision, reference_table["total"]["both"]["float32"])
    for path, result in report["flare"].items():
        # A pipelined run's transfers overlap the server's step: its waiting part is no transfer time.
        if "step_time_s" in result and path != "simulator_pipelined":
            # Activations as the controller counted them after every filter; gradients in the job's wire precision.
            moved = result["activation_bytes_per_iteration"] + down
            seconds = result["step_time_s"]["waiting_transfer"]
            throughput[path] = {"bytes": moved, "seconds": seconds, "mb_per_s": moved / seconds / 1e6}
    _log(f"loopback TCP copy of {moved / 1e6:.1f} MB")
    return {"loopback_tcp": loopback_tcp_copy(int(moved), repeats), **throughput}


def run_bench(settings: BenchSettings) -> dict:
    """Run every part of the benchmark and write ``bench.json`` and ``bench.md`` into ``settings.out_dir``.

    Order: data, step time and bytes at each size, the FLARE paths at the reference size, the POC runs over
    rate-limited links (if any rates are set), the loopback copy, accuracy at the reference size (unless the preset
    skips it). A FLARE path that fails is reported as such; the others still run.

    Returns:
        the report (also in ``bench.json``).
    """
    started = time.perf_counter()
    # $SPLITUNET_TORCH_THREADS, when set, bounds torch's threads (as for each FLARE party); else torch's default.
    configure_threads()
    out = settings.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    default_precision = settings.wire_precision
    report = {
        "command": settings.command,
        "machine": describe_machine(settings.device),
        "settings": settings.to_dict(),
        "default_wire_precision": default_precision,
    }
    phases = report["phase_s"] = {}
    clock = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = now - clock
        clock = now
        # A long run stopped from outside keeps what it measured so far.
        write_json_atomic({**report, "status": f"running (done: {', '.join(phases)})"}, out / "bench.json")

    _log(f"phantom data: {settings.cases} cases of {settings.volume_shape}")
    data = prepare_bench_data(
        out / "data", settings.cases, settings.volume_shape, settings.seed, settings.num_val_cases, settings.progress
    )
    phase_done("data")
    serializer = FeatureSerializer()
    report["sizes"] = []
    for problem in settings.sizes:
        _log(f"step time and bytes at {problem.name}")
        report["sizes"].append(time_problem_size(data, problem, settings, serializer))
    phase_done("step_time")
    reference = settings.reference
    report["flare"] = {
        "simulator": _flare_path(
            "simulator",
            settings.run_simulator,
            _skip_reason(settings, "simulator"),
            lambda: run_simulator_path(out, data, reference, settings),
        ),
        "poc": _flare_path(
            "poc", settings.run_poc, _skip_reason(settings, "poc"), lambda: run_poc_path(out, data, reference, settings)
        ),
    }
    if settings.pipelined and settings.run_simulator:
        # The same run with pipeline_delay 1: lock-step and pipelined step times side by side.
        report["flare"]["simulator_pipelined"] = _flare_path(
            "simulator, pipelined",
            True,
            "",
            lambda: run_simulator_path(out, data, reference, settings, pipeline_delay=1),
        )
    phase_done("flare")
    report["links"] = {}
    if settings.link_rates:
        link_table = report["sizes"][settings.link_size_index]["bytes_per_iteration"]
        report["links"] = run_link_paths(out, data, settings.link_size, settings, link_table)
        phase_done("links")
    reference_table = report["sizes"][settings.reference_index]["bytes_per_iteration"]
    report["throughput"] = _throughput(report, reference_table, default_precision, settings.loopback_repeats)
    phase_done("loopback")
    if settings.run_accuracy:
        _log(f"accuracy: {settings.accuracy_iterations} iterations per arm at {reference.name}")
        report["accuracy"] = train_and_validate(data, reference, settings, serializer)
    else:
        report["accuracy"] = {"skipped": f"not run (preset {settings.preset} times steps only; --iterations runs it)"}
    phase_done("accuracy")
    report["targets"] = evaluate_targets(report, default_precision)
    report["elapsed_s"] = time.perf_counter() - started
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report["status"] = "completed"
    write_report(report, out)
    return report


def failed_paths(report: dict) -> list[str]:
    """Names of the FLARE paths (and link rates) that were asked for and failed."""
    failed = [path for path, result in report["flare"].items() if "error" in result]
    links = report.get("links") or {}
    return failed + [
        f"links {rate}" for rate, result in links.items() if isinstance(result, dict) and "error" in result
    ]
