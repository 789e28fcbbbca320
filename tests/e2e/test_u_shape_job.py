"""The U-shaped job (``u_shape_unet``) in the FLARE simulator: two hospitals, one shared middle, a wire audit.

The run is :func:`splitunet.u_shape.demo.run_u_shape_demo`'s, with its wire audit on. Each hospital holds four
phantom cases (24^3, all four modalities and the labels). Two rounds of two iterations, with DWCS on, then
validation. ``WireAudit`` sits in all four chains of every task, so each party keeps a digest of
everything it sent and received. The server must never receive an image, a label or a prediction: at the crop's
full resolution it may receive ``x0`` only (``features[0]`` = 2 channels; an image has 4, a label or an output 3, a
single modality 1), and every hospital's Dice must reach ``results.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from nvflare.apis.dxo import DataKind as FlareDataKind

from splitunet.u_shape.demo import UShapeDemoSettings, run_u_shape_demo
from splitunet.u_shape.protocol import UTaskName
from splitunet.wire.codec import ENCODING_META_KEY
from splitunet.wire.protocol import DataKind

pytestmark = pytest.mark.e2e

HOSPITALS = ("hospital-1", "hospital-2")
CROP = (32, 32, 32)  # the smallest crop the bottleneck's instance norm allows; the 24^3 phantoms are padded to it
FEATURES = [2, 4, 4, 8, 8, 2]
SERVER_ARGS = {
    "num_rounds": 2,
    "iterations_per_round": 2,
    "batch_size": 1,
    "crop_size": list(CROP),
    "features": FEATURES,
    "num_val_cases": 1,
    "val_every": 2,
    "learning_rate": 0.01,
    "drift_correction": {},
    "task_long_poll_s": 0.5,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("u_shape")
    settings = UShapeDemoSettings(
        hospitals=len(HOSPITALS),
        cases=4,
        shape=(24, 24, 24),
        seed=40,
        server_args=SERVER_ARGS,
        wire_audit=True,
        timeout_s=300,
    )
    summary = run_u_shape_demo(workspace, settings)
    results = json.loads(Path(summary["server_results"]).read_text())
    return workspace, results, summary


def _audit(workspace: Path) -> dict[str, list[dict]]:
    return {
        path.stem.removeprefix("wire_"): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted((workspace / "simulator").rglob("audit/wire_*.jsonl"))
    }


def _server(audit: dict[str, list[dict]]) -> list[dict]:
    (server,) = [records for party, records in audit.items() if party not in HOSPITALS]
    return server


def _tensor_shapes(record: dict) -> dict[str, tuple[int, ...]]:
    """Each tensor entry's shape as the receiver decodes it (an int8 entry's payload is packed codes)."""
    encodings = (record.get("meta") or {}).get(ENCODING_META_KEY) or {}
    return {
        key: tuple(encodings[key]["shape"] if key in encodings else entry["shape"])
        for key, entry in record.get("entries", {}).items()
        if "shape" in entry
    }


def test_every_hospitals_dice_and_the_round_trips_are_recorded(run):
    _, results, summary = run
    assert results["status"] == "completed" and results["rounds"] == 2 and results["iterations"] == 4
    assert results["hospitals"] == {hospital: 3 for hospital in HOSPITALS}  # 4 cases, 1 held out
    assert results["drift_correction"]["method"] == "DWCS"
    for hospital in HOSPITALS:
        assert set(results["dice"][hospital]) == {"TC", "WT", "ET", "mean"}
        assert all(0.0 <= value <= 1.0 for value in results["dice"][hospital].values())
        assert set(results["hd95"][hospital]) == {"TC", "WT", "ET", "mean"}
        assert all(value >= 0.0 for value in results["hd95"][hospital].values())
    assert [entry["round"] for entry in results["history"]] == [2]
    assert len(results["loss_curve"]) == 4
    wire = results["wire"]
    # Two round trips per iteration, one per round to collect the weights; the average rides on the next task.
    assert {task: wire[task]["round_trips"] for task in wire if task != UTaskName.VALIDATE} == {
        UTaskName.SETUP: 1,
        UTaskName.FORWARD: 4,
        UTaskName.TAIL: 4,
        UTaskName.COLLECT: 2,
    }
    assert wire[UTaskName.VALIDATE]["round_trips"] >= 2
    # The runner's summary: Dice pooled over the hospitals' held-out cases, bytes per training iteration.
    assert summary["job"] == "u_shape_unet" and summary["iterations"] == 4 and summary["rounds"] == 2
    assert summary["simulator_exit_code"] == 0
    for region in ("TC", "WT", "ET"):
        expected = sum(results["dice"][hospital][region] for hospital in HOSPITALS) / len(HOSPITALS)
        assert summary["dice"][region] == pytest.approx(expected)
    assert summary["hospitals"] == {
        hospital: {
            "dice": results["dice"][hospital],
            "hd95": results["hd95"][hospital],
            "train_cases": 3,
            "val_cases": 1,
        }
        for hospital in HOSPITALS
    }
    for region in ("TC", "WT", "ET"):
        expected = sum(results["hd95"][hospital][region] for hospital in HOSPITALS) / len(HOSPITALS)
        assert summary["hd95"][region] == pytest.approx(expected)
    forward_tail_up = wire[UTaskName.FORWARD]["up_bytes"] + wire[UTaskName.TAIL]["up_bytes"]
    assert summary["activation_bytes_per_iteration"] == pytest.approx(forward_tail_up / 4)
    assert summary["wire_bytes_per_iteration"]["up"] > summary["activation_bytes_per_iteration"] > 0


def test_the_server_never_receives_an_image_a_label_or_a_prediction(run):
    workspace, _, _ = run
    received = [record for record in _server(_audit(workspace)) if record["direction"] == "in"]
    assert {record["peer"] for record in received} == set(HOSPITALS)
    kinds = Counter((record["task"], record["kind"]) for record in received)
    assert set(kinds) == {
        (UTaskName.SETUP, DataKind.CONTROL),
        (UTaskName.FORWARD, DataKind.ACTIVATIONS),
        (UTaskName.TAIL, DataKind.GRADIENTS),
        (UTaskName.COLLECT, FlareDataKind.WEIGHTS),
        (UTaskName.VALIDATE, DataKind.ACTIVATIONS),
        (UTaskName.VALIDATE, DataKind.CONTROL),
    }
    half = tuple(s // 2 for s in CROP)
    shapes = Counter()
    for record in received:
        for key, shape in _tensor_shapes(record).items():
            shapes[(key, shape[1], shape[2:])] += 1
            # Nothing at the crop's resolution with an image's, a modality's, a label's or an output's channels.
            assert not (shape[2:] == CROP and shape[1] in (1, 3, 4)), (record["task"], key, shape)
    # All it gets: x0 (2 channels, full resolution) and dL/du2 (4 channels, half resolution).
    assert set(shapes) == {("x0", FEATURES[0], CROP), ("x1", FEATURES[1], half)}
    weights = [record for record in received if record["kind"] == FlareDataKind.WEIGHTS]
    assert weights and all(key.split(".")[0] in ("head", "tail") for record in weights for key in record["entries"])
    controls = [record for record in received if record["kind"] == DataKind.CONTROL]
    assert all(not record["entries"] for record in controls)


def test_what_the_hospitals_send_is_what_the_server_receives_and_no_case_name_crosses(run):
    workspace, _, _ = run
    audit = _audit(workspace)
    server = _server(audit)

    def digests(records, direction, peer=None):
        return Counter(
            (record["task"], key, entry.get("sha256"))
            for record in records
            if record["direction"] == direction and (peer is None or record["peer"] == peer)
            for key, entry in record.get("entries", {}).items()
            if "sha256" in entry
        )

    for hospital in HOSPITALS:
        assert digests(audit[hospital], "out") == digests(server, "in", hospital)
        assert digests(server, "out", hospital) == digests(audit[hospital], "in")
    text = "".join(path.read_text() for path in (workspace / "simulator").rglob("audit/wire_*.jsonl"))
    assert "BRATS_" not in text  # the phantoms' case IDs
    # The server keeps no volume: its run folder holds the middle, the record and the audit only.
    server_files = [path for path in (workspace / "simulator" / "server").rglob("*") if path.is_file()]
    assert not [path for path in server_files if ".nii" in path.name]
    assert any(path.name == "u_shape_middle_last.pt" for path in server_files)
    for hospital in HOSPITALS:
        assert list((workspace / "simulator" / hospital).rglob("u_shape_hospital_last.pt"))
