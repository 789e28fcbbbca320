"""bench.links and its targets: the bound a shaped link allows, a skip with its reason, what the report judges."""

from __future__ import annotations

import pytest

import splitunet.evaluation.bench.links as links_module
from splitunet.evaluation.bench.links import LINK_SITES, link_bound, run_link_paths
from splitunet.evaluation.bench.targets import (
    LINK_BOUND_TARGET,
    PIPELINE_SPEEDUP_TARGET,
    TRANSPORT_RATE_TARGET,
    evaluate_targets,
)
from splitunet.tools.deployment import default_site_modalities
from splitunet.wire.protocol import MODALITIES


def test_link_sites_are_the_sites_the_poc_run_provisions():
    assert LINK_SITES == tuple(default_site_modalities(len(MODALITIES)))


def test_bound_is_compute_plus_one_sites_payload_both_ways_at_the_rate():
    parts = {"site_compute": 1.0, "server_compute": 2.0, "waiting_transfer": 1.5, "total": 4.5}
    bound = link_bound(parts, up_bytes=12.5e6, down_bytes=12.5e6, rate_bits=1e8)
    assert bound["wire_s"] == pytest.approx(2.0)  # 25 MB at 12.5 MB/s
    assert bound["bound_s"] == pytest.approx(5.0) and bound["ratio"] == pytest.approx(0.9)


def test_links_are_skipped_with_the_reason_where_namespaces_cannot_be_made(monkeypatch, tmp_path):
    monkeypatch.setattr(links_module, "netns_unavailable_reason", lambda: "network namespaces need root")
    assert run_link_paths(tmp_path, None, None, None, {}) == {"skipped": "network namespaces need root"}


def _report(links: dict, throughput: dict | None = None) -> dict:
    table = {
        "levels": {"x0": {"shape": [1], "up": {"float32": 400, "int8": 101}, "down": {"float32": 400, "int8": 101}}},
        "total": {
            "up": {"float32": 400, "int8": 101},
            "down": {"float32": 400, "int8": 101},
            "both": {"float32": 800, "int8": 202},
        },
        "num_sites": 4,
    }
    parts = {"site_compute": 1.0, "server_compute": 1.0, "serialization": 0.1, "total": 2.1}
    return {
        "settings": {"reference_size": "crop128"},
        "sizes": [
            {"size": {"name": "crop128"}, "step_time_s": {"split_in_process": parts}, "bytes_per_iteration": table}
        ],
        "flare": {"simulator": {"skipped": "not run"}, "poc": {"skipped": "not run"}},
        "throughput": throughput or {},
        "links": links,
        "accuracy": {"skipped": "not run (preset 128 times steps only)"},
    }


def _link(total: float, wire: float) -> dict:
    parts = {"site_compute": 1.0, "server_compute": 1.0, "waiting_transfer": total - 2.0, "total": total}
    bound = {"compute_s": 2.0, "wire_s": wire, "bound_s": 2.0 + wire, "ratio": total / (2.0 + wire)}
    raw = {"up": {"mbit_per_s": 95.9}, "down": {"mbit_per_s": 96.0}}
    return {"step_time_s": parts, "bound": bound, "site_payload_bytes": {"up": 5e6, "down": 5e6}, "raw_tcp": raw}


def test_each_rate_is_judged_against_its_bound_and_accuracy_is_left_out():
    targets = evaluate_targets(_report({"1gbit": _link(2.2, 0.08), "100mbit": _link(4.0, 0.8)}), "int8")
    by_name = {target["name"]: target for target in targets}
    fast = by_name["FLARE POC step over 1gbit links / (compute + site payload at 1gbit)"]
    slow = by_name["FLARE POC step over 100mbit links / (compute + site payload at 100mbit)"]
    assert fast["measured"] == pytest.approx(2.2 / 2.08) and fast["met"] is (fast["measured"] <= LINK_BOUND_TARGET)
    assert slow["measured"] == pytest.approx(4.0 / 2.8) and slow["met"] is False
    assert "10.0 MB per site both ways" in slow["note"] and "96 Mbit/s" in slow["note"]
    assert not any("Dice" in name for name in by_name)


def test_skipped_or_failed_links_are_not_measured():
    skipped = evaluate_targets(_report({"skipped": "needs root"}), "int8")
    [link] = [target for target in skipped if "links" in target["name"]]
    assert link["measured"] is None and link["met"] is None and link["note"] == "needs root"
    failed = evaluate_targets(_report({"1gbit": {"error": "PocError: site-2 exited"}}), "int8")
    [link] = [target for target in failed if "links" in target["name"]]
    assert link["met"] is None and "site-2 exited" in link["note"]
    assert not [target for target in evaluate_targets(_report({}), "int8") if "links" in target["name"]]


def test_transport_rate_is_judged_against_the_raw_loopback_copy():
    throughput = {
        "loopback_tcp": {"bytes": 2e8, "seconds": 0.05, "mb_per_s": 4000.0, "repeats": 3},
        "simulator": {"bytes": 2e8, "seconds": 10.0, "mb_per_s": 20.0},
    }
    targets = {target["name"]: target for target in evaluate_targets(_report({}, throughput), "int8")}
    simulator = targets["FLARE simulator transport rate / raw loopback TCP rate"]
    assert simulator["measured"] == pytest.approx(0.005)
    assert simulator["met"] is (simulator["measured"] >= TRANSPORT_RATE_TARGET) is False
    assert targets["FLARE POC transport rate / raw loopback TCP rate"]["measured"] is None


class _FakeLinks:
    """Stands in for the namespaces: nothing is created, nothing is killed."""

    killed = ()

    def __init__(self, plan):
        self.plan = plan

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _poc_figures(total: float) -> dict:
    parts = {"site_compute": 1.0, "server_compute": 1.0, "waiting_transfer": total - 2.0, "total": total}
    return {"step_time_s": parts, "activation_bytes_per_iteration": 4e6, "iterations": 5}


@pytest.mark.parametrize("pipelined_fails", [False, True])
def test_a_pipelined_run_follows_the_lock_step_one_over_the_same_links(monkeypatch, tmp_path, pipelined_fails):
    from splitunet.evaluation.bench.settings import BenchSettings

    runs = []

    def run_poc_path(out_dir, data, problem, settings, placement, pipeline_delay=0):
        runs.append((placement.folder, placement.host, pipeline_delay))
        if pipeline_delay and pipelined_fails:
            raise RuntimeError("the POC harness exited with code 1")
        return _poc_figures(6.0 if pipeline_delay else 9.0)

    monkeypatch.setattr(links_module, "netns_unavailable_reason", lambda: None)
    monkeypatch.setattr(links_module, "NamespaceLinks", _FakeLinks)
    monkeypatch.setattr(links_module, "tcp_copy", lambda *args: {"mbit_per_s": 9.5})
    monkeypatch.setattr(links_module, "run_poc_path", run_poc_path)
    settings = BenchSettings.create(tmp_path, quick=True, device="cpu", link_rates=["10mbit"], pipelined=True)
    assert settings.pipelined  # the links alone are reason enough to run it
    table = _report({})["sizes"][0]["bytes_per_iteration"]
    result = run_link_paths(tmp_path, None, settings.link_size, settings, table)["10mbit"]
    assert [(folder, delay) for folder, _, delay in runs] == [("poc_link_10mbit", 0), ("poc_link_10mbit_pipelined", 1)]
    assert runs[0][1] == runs[1][1] != "127.0.0.1"  # both consortia behind the shaped links
    assert result["step_time_s"]["total"] == 9.0 and "bound" in result  # the lock-step run is judged as before
    [target] = [t for t in evaluate_targets(_report({"10mbit": result}), "int8") if t["name"].startswith("pipelined")]
    if pipelined_fails:
        assert "exited with code 1" in result["pipelined"]["error"]
        assert target["measured"] is None and "exited with code 1" in target["note"]
    else:
        assert result["pipelined"]["throughput_ratio"] == pytest.approx(1.5)
        assert target["measured"] == pytest.approx(1.5) and target["met"] is (1.5 >= PIPELINE_SPEEDUP_TARGET)
        assert "10mbit" in target["name"] and "6.000 s pipelined against 9.000 s" in target["note"]


def test_the_simulators_pipelined_run_is_judged_against_its_lock_step_run():
    report = _report({})
    report["flare"] = {
        "simulator": _poc_figures(4.0),
        "poc": {"skipped": "no"},
        "simulator_pipelined": _poc_figures(2.0),
    }
    [target] = [t for t in evaluate_targets(report, "int8") if t["name"].startswith("pipelined")]
    assert target["measured"] == pytest.approx(2.0) and target["met"] is True and "simulator" in target["name"]
    assert not [t for t in evaluate_targets(_report({}), "int8") if t["name"].startswith("pipelined")]


def test_the_report_shows_the_pipelined_run_under_its_lock_step_run():
    from splitunet.evaluation.bench.report import _links_section

    result = {**_link(9.0, 4.5), "pipelined": {**_poc_figures(6.0), "throughput_ratio": 1.5}}
    failed = {**_link(9.0, 4.5), "pipelined": {"error": "RuntimeError: harness exited"}}
    report = {**_report({"10mbit": result, "20mbit": failed}), "settings": {"link_size": "crop64"}}
    text = "\n".join(_links_section(report))
    assert "| 10mbit, pipelined (lock-step / pipelined: 1.50x) | **6.000** |" in text
    assert "| 20mbit, pipelined | RuntimeError: harness exited |" in text
