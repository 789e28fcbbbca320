"""The split step over links like real sites': the main job in POC mode, every party in a network namespace.

For each rate, :class:`~splitunet.tools.netns_links.NamespaceLinks` builds a server namespace and one namespace per
site, each site joined to the server by its own veth pair with a token bucket at the rate on both ends (each
direction of each link is limited on its own; latency is not simulated). A fresh POC consortium then runs there:
the server listens on the server namespace's address, which its kits carry, each site's processes run in the
site's namespace, and the harness with its admin client runs beside the server. The links are torn down after the
run, also when it fails.

Each run is judged against what the link allows: its own compute (slowest site, server) plus each site's payload
(up: activations as the controller received them; down: gradients in the job's wire precision) at the link's rate.
A plain TCP copy over the same link (one site's payload, at least a second's worth of traffic) shows what TCP
itself sustains there.

With ``settings.pipelined`` a second consortium runs the job pipelined (``pipeline_delay`` 1) over the same links
right after the lock-step one, and the throughput ratio (lock-step step time over pipelined) says what the delay
buys over this link. It hides the server's step behind the site's chain (gradients down, the site's compute,
activations up), not the wire: the next upload waits for the task that brings the gradients
(docs/benchmark.md, "Pipelined steps over shaped links").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from splitunet.evaluation.bench.flare_runs import PocPlacement, run_poc_path
from splitunet.evaluation.bench.phantom_data import BenchData
from splitunet.evaluation.bench.settings import BenchSettings, ProblemSize
from splitunet.tools.netns_links import SERVER, LinkPlan, NamespaceLinks, netns_unavailable_reason, tcp_copy
from splitunet.wire.protocol import MODALITIES

__all__ = ["run_link_paths", "link_bound", "LINK_SITES"]

# The sites of the main job's POC runs (site-1..site-4, one modality each), as run_poc_path provisions them.
LINK_SITES = tuple(f"site-{index}" for index in range(1, len(MODALITIES) + 1))


def _log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def link_bound(step_time_s: Mapping[str, float], up_bytes: float, down_bytes: float, rate_bits: float) -> dict:
    """The fastest step the link allows: this run's compute plus one site's payload both ways at the link's rate.

    Sites send in parallel over links of their own, so one site's bytes (not all sites') cross each link; up and
    down happen at different times of the step (activations before the server's step, gradients after it).

    Args:
        step_time_s: the run's parts (``site_compute``, ``server_compute``, ``total``).
        up_bytes, down_bytes: one site's payload per step in each direction.
        rate_bits: the link's rate in bits per second.

    Returns:
        ``{"compute_s", "wire_s", "bound_s", "ratio"}``: ratio is the run's step over the bound.
    """
    compute = step_time_s["site_compute"] + step_time_s["server_compute"]
    wire = (up_bytes + down_bytes) * 8 / rate_bits
    return {
        "compute_s": compute,
        "wire_s": wire,
        "bound_s": compute + wire,
        "ratio": step_time_s["total"] / (compute + wire),
    }


def _site_payload(table: Mapping, precision: str, activation_bytes: float | None) -> tuple[float, float]:
    """One site's bytes per step: up as the controller counted them (else the table's), down from the table."""
    sites = table["num_sites"]
    down = table["total"]["down"].get(precision, table["total"]["down"]["float32"]) / sites
    up = activation_bytes / sites if activation_bytes else table["total"]["up"].get(precision) / sites
    return up, down


def _one_link(
    out_dir: Path, data: BenchData, problem: ProblemSize, settings: BenchSettings, table: Mapping, rate: str
) -> dict:
    plan = LinkPlan(LINK_SITES, rate)
    up, down = _site_payload(table, settings.wire_precision, None)
    # At least a second of traffic, so that the bucket's burst does not inflate the sustained rate.
    copied = [int(max(payload, plan.rate_bits / 8)) for payload in (up, down)]
    # At a quarter of the rate the copy would still finish: a bound, not an expectation.
    copy_timeout = max(60.0, 4 * max(copied) * 8 / plan.rate_bits)
    placement = PocPlacement(
        folder=f"poc_link_{rate}",
        host=plan.server_address,
        harness_prefix=tuple(plan.exec_prefix(SERVER)),
        party_prefixes={site: tuple(plan.exec_prefix(site)) for site in LINK_SITES},
    )
    with NamespaceLinks(plan) as links:
        _log(f"links at {rate}: {len(LINK_SITES)} site namespaces, server at {plan.server_address}")
        raw = {
            "up": tcp_copy(plan, LINK_SITES[0], SERVER, copied[0], copy_timeout),
            "down": tcp_copy(plan, SERVER, LINK_SITES[0], copied[1], copy_timeout),
        }
        figures = run_poc_path(out_dir, data, problem, settings, placement)
        pipelined = _pipelined_run(out_dir, data, problem, settings, placement, rate) if settings.pipelined else None
    up, down = _site_payload(table, settings.wire_precision, figures["activation_bytes_per_iteration"])
    result = {
        **figures,
        "link": plan.describe(),
        "site_payload_bytes": {"up": up, "down": down},
        "raw_tcp": raw,
        "bound": link_bound(figures["step_time_s"], up, down, plan.rate_bits),
        "killed_at_teardown": len(links.killed),
    }
    if pipelined is not None:
        if "step_time_s" in pipelined:
            pipelined["throughput_ratio"] = figures["step_time_s"]["total"] / pipelined["step_time_s"]["total"]
        result["pipelined"] = pipelined
    return result


def _pipelined_run(
    out_dir: Path, data: BenchData, problem: ProblemSize, settings: BenchSettings, placement: PocPlacement, rate: str
) -> dict:
    """The same POC run with ``pipeline_delay`` 1 in the same namespaces; a failure is reported, not raised."""
    _log(f"FLARE POC over {rate} links, pipelined")
    pipelined = dataclasses.replace(placement, folder=f"{placement.folder}_pipelined")
    try:
        return run_poc_path(out_dir, data, problem, settings, pipelined, pipeline_delay=1)
    except Exception as error:  # noqa: BLE001 - the lock-step run's measurement stands on its own
        _log(f"pipelined run over {rate} links failed: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {error}"}


def run_link_paths(
    out_dir: Path, data: BenchData, problem: ProblemSize, settings: BenchSettings, table: Mapping
) -> dict:
    """One POC run per rate of ``settings.link_rates`` over shaped links, each in fresh namespaces.

    Args:
        out_dir: the benchmark's output folder (each run gets ``poc_link_<rate>/``).
        data: the benchmark data.
        problem: the size the runs train at.
        settings: the benchmark settings (iterations, warm-up, timeouts, wire precision).
        table: the byte table of one in-process split step at ``problem``.

    Returns:
        rate -> the run's figures, its link, the raw TCP copy and the bound; ``{"skipped": reason}`` where network
        namespaces cannot be made here; a rate whose run failed maps to ``{"error": ...}``.
    """
    reason = netns_unavailable_reason()
    if reason is not None:
        _log(f"links skipped: {reason}")
        return {"skipped": reason}
    results = {}
    for rate in settings.link_rates:
        _log(f"FLARE POC over {rate} links at {problem.name}")
        try:
            results[rate] = _one_link(out_dir, data, problem, settings, table, rate)
        except Exception as error:  # noqa: BLE001 - one failed rate must not lose the others' measurements
            _log(f"links at {rate} failed: {type(error).__name__}: {error}")
            results[rate] = {"error": f"{type(error).__name__}: {error}"}
    return results
