"""``bench.json`` and ``bench.md``: the measurements of one run and its targets, in words and tables."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.compute.devices import THREADS_ENV_VAR
from splitunet.evaluation.bench.step_timing import STEP_ARMS
from splitunet.networks.optimizer import OPTIMIZER_NAME
from splitunet.wire.protocol import REGIONS

__all__ = ["write_report", "render_markdown", "load_report"]

_MB = 1e6  # the report's MB: 10^6 bytes
_PARTS = ("compute", "site_compute", "server_compute", "serialization", "waiting_transfer", "other")


def _cell(text: str, limit: int = 200) -> str:
    """Text fit for a Markdown table cell: first line, no pipes, at most ``limit`` characters (JSON has it all)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    line = line.replace("|", "/")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _s(value) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:.0f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value / _MB:.2f}"


def _machine_lines(machine: Mapping, settings: Mapping) -> list[str]:
    gpu = (
        f"; GPU {machine['gpu_name']} ({machine['gpu_memory_gib']} GiB, CUDA {machine['cuda']})"
        if "gpu_name" in machine
        else ""
    )
    threads = f" (${THREADS_ENV_VAR}={machine['threads_env']})" if machine.get("threads_env") else ""
    return [
        f"- machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, "
        f"torch threads {machine['torch_threads']}{threads}{gpu}",
        f"- software: Python {machine['python']}, torch {machine['torch']}, MONAI {machine['monai']}, "
        f"nvflare {machine['nvflare'] or 'not installed'}; {machine['platform']}",
        f"- device of the in-process arms: {settings['device']}; AMP (bfloat16 autocast): {settings['amp']}",
    ]


def _targets_table(targets) -> list[str]:
    lines = ["| target | measured | goal | met | what dominates / context |", "|---|---|---|---|---|"]
    for target in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        measured = "-" if target["measured"] is None else f"{target['measured']:.3f}"
        lines.append(f"| {target['name']} | {measured} | {target['goal']} | {met} | {_cell(target['note'], 600)} |")
    return lines


def _step_rows(name: str, label: str, parts: Mapping) -> str:
    cells = " | ".join(_s(parts.get(part)) for part in _PARTS)
    return f"| {name} | {label} | **{_s(parts.get('total'))}** | {_s(parts.get('total_median'))} | {cells} |"


def _step_tables(report: Mapping) -> list[str]:
    settings = report["settings"]
    warmup = settings.get("flare_warmup_iterations", 0)
    flare_means = (
        f"the FLARE rows are means over the iterations after the first {warmup} (the controller's per-step scalars)"
        if warmup
        else "the FLARE rows are the controller's means over all its iterations, the first included"
    )
    lines = [
        f"Mean seconds per training iteration over {settings['timed_steps']} steps after {settings['warmup_steps']} "
        f"warm-up steps (in process); {flare_means}. In process the four sites run one after the other (site "
        "compute is their sum); under FLARE they run in parallel processes and site compute is the slowest site's.",
        "",
    ]
    header = "| arm | what | total | median | " + " | ".join(p.replace("_", " ") for p in _PARTS) + " |"
    for size in report["sizes"]:
        problem = size["size"]
        lines += [
            f"### {problem['name']}: crop {problem['crop_size']}, batch {problem['batch_size']}, "
            f"features {problem['features']}",
            "",
            header,
            "|" + "---|" * (4 + len(_PARTS)),
        ]
        for arm, parts in size["step_time_s"].items():
            lines.append(_step_rows(arm, STEP_ARMS.get(arm, arm), parts))
        split = size["step_time_s"]["split_in_process"]
        notes = []
        largest = max((p for p in _PARTS if p in split and p != "other"), key=split.get)
        if problem["name"] == settings["reference_size"]:
            for path, result in report["flare"].items():
                if "step_time_s" in result:
                    what = f"the main job in FLARE {path}, {result['iterations']} iterations"
                    lines.append(_step_rows(f"flare_{path}", what, result["step_time_s"]))
                    if result.get("total_per_step_s"):
                        each = ", ".join(f"{value:.2f}" for value in result["total_per_step_s"])
                        notes.append(f"FLARE {path}, seconds of each iteration (warm-up first): {each}.")
                else:
                    reason = _cell(result.get("skipped") or f"failed: {result.get('error')}")
                    lines.append(f"| flare_{path} | {reason} |" + " |" * (2 + len(_PARTS)))
        lines += [
            "",
            f"Largest part of the in-process split step: {largest} ({split[largest] / split['total']:.0%}).",
            "",
        ]
        if notes:
            lines += [*notes, ""]
    if len(report["sizes"]) > 1:
        first, last = report["sizes"][0], report["sizes"][-1]
        growth = ", ".join(
            f"{arm} {last['step_time_s'][arm]['total'] / first['step_time_s'][arm]['total']:.2f}x"
            for arm in first["step_time_s"]
        )
        voxels = math.prod(last["size"]["crop_size"]) / math.prod(first["size"]["crop_size"])
        lines += [
            f"Growth from {first['size']['name']} to {last['size']['name']} ({voxels:.2f}x voxels): {growth}.",
            "",
        ]
    return lines


def _bytes_tables(report: Mapping) -> list[str]:
    lines = []
    for size in report["sizes"]:
        table = size["bytes_per_iteration"]
        precisions = list(table["total"]["up"])
        lines += [
            f"### {size['size']['name']} ({table['num_sites']} sites, MB = 10^6 bytes)",
            "",
            "| level | shape per site | "
            + " | ".join(f"up {p}" for p in precisions)
            + " | "
            + " | ".join(f"down {p}" for p in precisions)
            + " |",
            "|" + "---|" * (2 + 2 * len(precisions)),
        ]
        for level, entry in table["levels"].items():
            cells = [_mb(entry[d][p]) for d in ("up", "down") for p in precisions]
            lines.append(f"| {level} | {entry['shape']} | " + " | ".join(cells) + " |")
        cells = [_mb(table["total"][d][p]) for d in ("up", "down") for p in precisions]
        lines.append("| **all** | | " + " | ".join(f"**{c}**" for c in cells) + " |")
        pcie = size.get("pcie_bytes_per_iteration")
        copies = (
            f"{_mb(pcie)} MB per iteration copied between device and host by all parties of the in-process split "
            f"(crops, labels, features in the wire's precision, gradients)"
            if pcie is not None
            else "no device-host copies (the in-process arms ran on the CPU)"
        )
        lines += [
            "",
            f"Serialized by {size['serializer']}, headers included, both ways: "
            f"{_mb(table['serialized_both'])} MB per iteration. PCIe: {copies}.",
            "",
        ]
    return lines


def _throughput_table(report: Mapping) -> list[str]:
    loopback = report["throughput"]["loopback_tcp"]
    lines = [
        "| path | bytes per iteration, both ways (MB) | seconds | MB/s | of loopback |",
        "|---|---|---|---|---|",
        f"| raw TCP copy on 127.0.0.1 (median of {loopback['repeats']}) | {_mb(loopback['bytes'])} | "
        f"{_s(loopback['seconds'])} | {loopback['mb_per_s']:.0f} | 1.00 |",
    ]
    for path, entry in report["throughput"].items():
        if path == "loopback_tcp":
            continue
        lines.append(
            f"| FLARE {path}: waiting/transfer part of the step | {_mb(entry['bytes'])} | {_s(entry['seconds'])} | "
            f"{entry['mb_per_s']:.0f} | {entry['mb_per_s'] / loopback['mb_per_s']:.3f} |"
        )
    return lines + [""]


def _links_section(report: Mapping) -> list[str]:
    """POC runs over rate-limited links: step parts, the bound, the plain TCP copy over the same link."""
    links = report.get("links") or {}
    if not links:
        return []
    lines = ["## Over rate-limited links (POC, every party in a network namespace)", ""]
    if "skipped" in links:
        return lines + [f"Not run: {links['skipped']}.", ""]
    settings = report["settings"]
    lines += [
        f"The main job at {settings.get('link_size')} in a fresh POC consortium per rate: the server and each site "
        "in a network namespace of their own, each site's veth link shaped by a token bucket on both ends (each "
        "direction at the rate); latency not simulated. Bound: the run's own compute (slowest site + server) plus "
        "one site's payload up and down at the rate.",
        "",
        "| rate | step | site compute | server compute | waiting/transfer | wire time at rate | bound | step / bound "
        "| MB per site (up / down) | plain TCP over the link, Mbit/s (up / down) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, result in links.items():
        if "bound" not in result:
            lines.append(f"| {rate} | {_cell(result.get('error') or result.get('skipped'))} |" + " |" * 8)
            continue
        parts, bound, payload = result["step_time_s"], result["bound"], result["site_payload_bytes"]
        raw = result["raw_tcp"]
        lines.append(
            f"| {rate} | **{_s(parts['total'])}** | {_s(parts['site_compute'])} | {_s(parts['server_compute'])} | "
            f"{_s(parts['waiting_transfer'])} | {_s(bound['wire_s'])} | {_s(bound['bound_s'])} | "
            f"{bound['ratio']:.2f} | {_mb(payload['up'])} / {_mb(payload['down'])} | "
            f"{raw['up']['mbit_per_s']:.0f} / {raw['down']['mbit_per_s']:.0f} |"
        )
        pipelined = result.get("pipelined")
        if pipelined is None:
            continue
        if "step_time_s" not in pipelined:
            lines.append(f"| {rate}, pipelined | {_cell(pipelined.get('error'))} |" + " |" * 8)
            continue
        piped = pipelined["step_time_s"]
        lines.append(
            f"| {rate}, pipelined (lock-step / pipelined: {pipelined['throughput_ratio']:.2f}x) | "
            f"**{_s(piped['total'])}** | {_s(piped['site_compute'])} | {_s(piped['server_compute'])} | "
            f"{_s(piped['waiting_transfer'])} | {_s(bound['wire_s'])} | | | | |"
        )
    return lines + [""]


def _accuracy_table(accuracy: Mapping) -> list[str]:
    if "arms" not in accuracy:
        return [f"Not measured: {accuracy.get('skipped', 'not run')}.", ""]
    size = accuracy["size"]
    lines = [
        f"{accuracy['iterations']} iterations per arm, crop {size['crop_size']}, batch {size['batch_size']}, the same "
        f"crops in the same order; Dice (MONAI DiceMetric, sliding window as the FLARE server validates) on "
        f"{accuracy['val_cases']} held-out phantom cases ({accuracy['train_cases']} for training).",
        "",
        "| arm | " + " | ".join(REGIONS) + " | mean | final loss | train s |",
        "|---|" + "---|" * (len(REGIONS) + 3),
    ]
    for name, arm in accuracy["arms"].items():
        dice = " | ".join(_s(arm["dice"][r]) for r in (*REGIONS, "mean"))
        lines.append(f"| {name} | {dice} | {_s(arm['final_loss'])} | {_s(arm['train_s'])} |")
    return lines + [""] + _repeats_table(accuracy)


def _repeats_table(accuracy: Mapping) -> list[str]:
    """Mean Dice of the arms trained from several seeds, one column per seed (the first is the table above)."""
    repeated = {name: arm["repeats"] for name, arm in accuracy["arms"].items() if len(arm.get("repeats") or []) > 1}
    if not repeated:
        return []
    seeds = accuracy.get("seeds") or sorted({r["seed"] for runs in repeated.values() for r in runs})
    lines = [
        f"Mean Dice of the arms trained from {len(seeds)} seeds (initial weights and crop order; the same seed "
        "gives every arm the same):",
        "",
        "| arm | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean | sd |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for name, runs in repeated.items():
        by_seed = {r["seed"]: r["dice"]["mean"] for r in runs}
        values = [by_seed[seed] for seed in seeds if seed in by_seed]
        cells = " | ".join(_s(by_seed.get(seed)) if seed in by_seed else "-" for seed in seeds)
        sd = statistics.stdev(values) if len(values) > 1 else None
        lines.append(f"| {name} | {cells} | {_s(statistics.fmean(values))} | {_s(sd)} |")
    return lines + [""]


def render_markdown(report: Mapping) -> str:
    """The report as Markdown: command, machine, targets, step times, bytes, throughput, accuracy."""
    settings = report["settings"]
    lines = [
        "# Split-U-Net benchmark",
        "",
        f"Command: `{report['command']}` ({report['elapsed_s']:.0f} s, {report['finished']})",
        "",
        "Seconds per phase: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in report["phase_s"].items()),
        "",
        *_machine_lines(report["machine"], settings),
        f"- data: {settings['cases']} phantom cases of {settings['volume_shape']}; job settings: loss "
        f"{settings['loss']}, {OPTIMIZER_NAME} lr {settings['learning_rate']}, "
        f"weight decay {settings['weight_decay']}, "
        f"transfer dtype {settings['transfer_dtype']} (default on the wire: {report['default_wire_precision']})",
        "",
        "## Targets (ratios measured in this run)",
        "",
        *_targets_table(report["targets"]),
        "",
        "## Step time",
        "",
        *_step_tables(report),
        "## Bytes per iteration, by skip level",
        "",
        *_bytes_tables(report),
        "## Achieved throughput",
        "",
        *_throughput_table(report),
        *_links_section(report),
        "## Accuracy at equal iteration budget",
        "",
        *_accuracy_table(report["accuracy"]),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: Mapping, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    write_json_atomic(dict(report), json_path)
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def load_report(out_dir: str | Path) -> dict:
    """Read a written ``bench.json``."""
    return json.loads((Path(out_dir) / "bench.json").read_text())
