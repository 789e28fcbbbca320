"""`splitunet bench --quick`: the whole benchmark runs and every figure in its report is a measurement.

No timing is asserted: only that each time, byte count and rate is positive and finite, each Dice a score in
[0, 1], and that the report has the structure docs/benchmark.md describes.
"""

from __future__ import annotations

import json
import math
from numbers import Number

import pytest
import torch

from splitunet.compute.devices import THREADS_ENV_VAR
from splitunet.evaluation.bench.serialization import flare_available
from splitunet.tools.cli import main
from splitunet.wire.protocol import MODALITIES, REGIONS

pytestmark = pytest.mark.e2e  # runs the FLARE simulator (tiny) where nvflare is installed

# Parts of the report that hold settings and descriptions rather than measurements.
_NOT_FIGURES = {
    "settings",
    "machine",
    "targets",
    "size",
    "command",
    "finished",
    "default_wire_precision",
    "seeds",
    "seed",
}


def _figures(node, path=""):
    """(path, number) for every number in the report outside settings and descriptions."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in _NOT_FIGURES:
                yield from _figures(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _figures(value, f"{path}/{index}")
    elif isinstance(node, Number) and not isinstance(node, bool):
        yield path, node


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Two seeds: the wire pair's repeats are part of the pipeline too.
    argv = ["bench", "--quick", "--seeds", "2", "--out", str(out), "--quiet"]
    argv += [] if flare_available() else ["--no-flare"]
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        # One torch thread, as each FLARE party gets: on a busy 2-core machine, OpenMP threads waiting at barriers
        # for a descheduled peer stretch this one-minute run to ten.
        patch.setenv(THREADS_ENV_VAR, "1")
        assert main(argv) == 0
    torch.set_num_threads(threads)  # the bench set it for this process; later tests get the default back
    return out, json.loads((out / "bench.json").read_text())


def test_every_figure_is_a_measurement(quick_report):
    _, report = quick_report
    assert report["status"] == "completed"
    figures = list(_figures(report))
    assert len(figures) > 100
    for path, value in figures:
        assert math.isfinite(value), path
        if "/dice/" in path:
            assert 0.0 <= value <= 1.0, path
        else:
            assert value > 0, path


def test_step_times_and_bytes_at_two_sizes(quick_report):
    _, report = quick_report
    assert len(report["sizes"]) == 2
    crops = [size["size"]["crop_size"][0] for size in report["sizes"]]
    assert crops[0] < crops[1]
    for size in report["sizes"]:
        times = size["step_time_s"]
        assert set(times) == {"centralized", "monolithic_split_unet", "split_in_process"}
        assert {"site_compute", "server_compute", "serialization", "total"} <= set(times["split_in_process"])
        table = size["bytes_per_iteration"]
        assert list(table["levels"]) == ["x0", "x1", "x2", "x3", "x4"]
        for direction in ("up", "down", "both"):
            totals = table["total"][direction]
            assert totals["float16"] * 2 == totals["float32"]
            assert totals["float32"] / 4 < totals["int8"] < totals["float16"]
    growth = report["sizes"][1]["bytes_per_iteration"]["total"]["both"]["float32"]
    assert growth > report["sizes"][0]["bytes_per_iteration"]["total"]["both"]["float32"]


def test_flare_paths_loopback_and_accuracy(quick_report):
    _, report = quick_report
    assert report["flare"]["poc"]["skipped"].startswith("not run")
    if flare_available():
        simulator = report["flare"]["simulator"]
        assert {"site_compute", "server_compute", "waiting_transfer", "total"} <= set(simulator["step_time_s"])
        assert set(report["throughput"]) == {"loopback_tcp", "simulator"}
    assert report["throughput"]["loopback_tcp"]["mb_per_s"] > 0
    arms = report["accuracy"]["arms"]
    other = "float32" if report["default_wire_precision"] != "float32" else "int8"
    assert set(arms) == {"centralized", "centralized_split_architecture", "split", f"split_{other}"} | {
        f"single_{m}" for m in MODALITIES
    }
    assert all(set(arm["dice"]) == {*REGIONS, "mean"} for arm in arms.values())
    assert report["accuracy"]["seeds"] == [0, 1]
    repeated = ("split", f"split_{other}", "centralized_split_architecture")
    for name in repeated:
        assert [run["seed"] for run in arms[name]["repeats"]] == [0, 1]
        assert arms[name]["repeats"][0]["dice"] == arms[name]["dice"]
    assert all("repeats" not in arm for name, arm in arms.items() if name not in repeated)


def test_targets_are_reported_not_asserted(quick_report):
    _, report = quick_report
    names = [target["name"] for target in report["targets"]]
    assert any("simulator step" in name for name in names)
    assert any("bytes" in name for name in names)
    assert any("single modality" in name for name in names)
    for target in report["targets"]:
        assert target["measured"] is None or math.isfinite(target["measured"])
        assert target["met"] in (True, False, None)
        assert target["note"]


def test_markdown_states_command_and_machine(quick_report):
    out, report = quick_report
    text = (out / "bench.md").read_text()
    assert f"`{report['command']}`" in text
    assert report["command"].startswith("splitunet bench --out") and "--quick" in report["command"]
    assert report["machine"]["cpu_model"] in text
    assert f"torch threads {report['machine']['torch_threads']}" in text
    for heading in ("## Targets", "## Step time", "## Bytes per iteration", "## Achieved throughput", "## Accuracy"):
        assert heading in text
