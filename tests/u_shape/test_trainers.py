"""u_shape trainers in one process: learning, what the server receives, the averaging and its correction."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from splitunet.data.hospital_folder import HospitalFolder
from splitunet.federated.averaging import weighted_average
from splitunet.u_shape import in_process
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.hospital_trainer import HospitalTrainer
from splitunet.u_shape.networks import seeded_part
from splitunet.u_shape.server_trainer import MiddleTrainer

FEATURES = (2, 4, 4, 8, 8, 2)
CROP = (32, 32, 32)


@pytest.fixture(scope="module")
def hospital_dirs(tiny_parties, tmp_path_factory):
    """Hospital a: the 3-case phantom (34x36x33); hospital b: a copy of two of its cases."""
    source = tiny_parties.parent / "msd"
    other = tmp_path_factory.mktemp("hospital_b")
    index = json.loads((source / "dataset.json").read_text())
    index["training"] = index["training"][:2]
    index["numTraining"] = 2
    for entry in index["training"]:
        for key in ("image", "label"):
            (other / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / entry[key], other / entry[key])
    (other / "dataset.json").write_text(json.dumps(index))
    return {"a": source, "b": other}


class RecordingMiddle(MiddleTrainer):
    """The server's trainer, recording the shape of every tensor handed to it."""

    def __init__(self):
        super().__init__("cpu")
        self.received: list[tuple[str, tuple[int, ...]]] = []

    def _record(self, what, tensors):
        self.received += [(what, tuple(t.shape)) for t in tensors.values()]

    def forward(self, x0_by_party):
        self._record("x0", x0_by_party)
        return super().forward(x0_by_party)

    def backward(self, du2_by_party):
        self._record("du2", du2_by_party)
        return super().backward(du2_by_party)

    def infer(self, x0_by_party):
        self._record("x0 (validation)", x0_by_party)
        return super().infer(x0_by_party)


def _build(hospital_dirs, **overrides):
    config = UShapeConfig(
        **{"features": FEATURES, "crop_size": CROP, "batch_size": 1, "learning_rate": 0.01, "seed": 3, **overrides}
    )
    hospitals = {}
    for party, folder in hospital_dirs.items():
        hospitals[party] = HospitalTrainer(HospitalFolder(folder, party=party))
        hospitals[party].build(config)
    server = RecordingMiddle()
    server.build(config)
    return hospitals, server


def test_training_lowers_the_loss_and_the_server_gets_only_x0_and_du2(hospital_dirs):
    hospitals, server = _build(hospital_dirs)
    losses = in_process.train(hospitals, server, num_rounds=2, iterations_per_round=2)
    mean = [float(np.mean(list(step.values()))) for step in losses]
    print(f"mean loss per iteration: {mean}")
    assert np.mean(mean[-2:]) < np.mean(mean[:2]), mean
    dice = in_process.validate(hospitals, server)
    assert set(dice) == {"a", "b"} and all(set(d) == {"TC", "WT", "ET", "mean"} for d in dice.values())

    # What the server was handed, all of it: x0 at full resolution with features[0] channels, dL/du2 at half.
    half = tuple(s // 2 for s in CROP)
    assert set(server.received) == {
        ("x0", (1, FEATURES[0], *CROP)),
        ("du2", (1, FEATURES[1], *half)),
        ("x0 (validation)", (4, FEATURES[0], *CROP)),  # sw_batch_size windows of the crop size
    }
    # Never an image (4 modalities), a modality (1) or a label or prediction (3 regions) at crop resolution.
    assert not [shape for _, shape in server.received if shape[2:] == CROP and shape[1] in (1, 3, 4)]
    assert server.steps_applied == 4 and all(h.steps_applied == 4 for h in hospitals.values())


def test_a_round_ends_with_every_hospital_holding_the_case_weighted_average(hospital_dirs):
    hospitals, _ = _build(hospital_dirs, num_val_cases=1)
    assert {party: h.num_train_cases for party, h in hospitals.items()} == {"a": 2, "b": 1}
    with torch.no_grad():
        for parameter in hospitals["b"].head.parameters():
            parameter.add_(1.0)  # the hospitals' heads now differ
    before = {party: h.parts_state() for party, h in hospitals.items()}
    in_process.average_round(hospitals, round_index=0)
    for part in ("head", "tail"):
        expected = weighted_average([before["a"][part], before["b"][part]], [2, 1])
        for hospital in hospitals.values():
            state = getattr(hospital, part).state_dict()
            for name, tensor in expected.items():
                torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6)
    name = "conv_0.conv_0.conv.weight"
    mixed = hospitals["a"].head.state_dict()[name]
    torch.testing.assert_close(mixed, before["a"]["head"][name] + 1.0 / 3.0)  # b's +1 counts one third


class RecordingCorrection:
    """Stands in for DWCS: records what it is asked to correct and moves every weight by +0.5."""

    def __init__(self):
        self.calls = []

    def apply(self, state, round_index, part="model"):
        self.calls.append((part, round_index, sorted(state)))
        return {name: tensor + 0.5 for name, tensor in state.items()}


def test_dwcs_corrects_each_averaged_part_with_the_round_and_the_hospitals_get_the_correction(hospital_dirs):
    hospitals, _ = _build(hospital_dirs)
    correction = RecordingCorrection()
    averaged = in_process.average_round(hospitals, round_index=0, correction=correction)
    in_process.average_round(hospitals, round_index=1, correction=correction)
    assert [(part, round_index) for part, round_index, _ in correction.calls] == [
        ("head", 0),
        ("tail", 0),
        ("head", 1),
        ("tail", 1),
    ]
    assert correction.calls[0][2] == sorted(hospitals["a"].head.state_dict())
    name = "final_conv.weight"
    torch.testing.assert_close(hospitals["b"].tail.state_dict()[name], averaged["tail"][name] + 0.5)


def test_steps_out_of_order_are_refused(hospital_dirs):
    hospitals, server = _build({"a": hospital_dirs["a"]})
    hospital = hospitals["a"]
    with pytest.raises(RuntimeError, match="no forward pass is waiting"):
        hospital.tail_step(torch.zeros(1, FEATURES[1], 16, 16, 16))
    x0 = hospital.forward()
    with pytest.raises(RuntimeError, match="not finished"):
        hospital.forward()
    with pytest.raises(RuntimeError, match="unfinished"):
        hospital.parts_state()
    with pytest.raises(ValueError, match="u2 has shape"):
        hospital.tail_step(torch.zeros(1, FEATURES[1], 8, 8, 8))
    with pytest.raises(ValueError, match="x0 of shape"):
        server.forward({"a": torch.zeros(1, 4, *CROP)})  # an image is not an x0
    u2 = server.forward({"a": x0})
    with pytest.raises(ValueError, match="gradients from"):
        server.backward({"z": u2["a"]})


def test_batching_the_hospitals_changes_no_hospitals_u2_or_gradient():
    torch.manual_seed(0)
    config = UShapeConfig(features=FEATURES, crop_size=CROP)
    batched, alone = MiddleTrainer(), MiddleTrainer()
    batched.build(config)
    alone.build(config)
    x0 = {"a": torch.randn(1, FEATURES[0], *CROP), "b": torch.randn(2, FEATURES[0], *CROP)}
    du2 = {party: torch.randn(x.shape[0], FEATURES[1], 16, 16, 16) for party, x in x0.items()}
    u2 = batched.forward(x0)
    dx0 = batched.backward(du2)
    for party in x0:
        # Equal up to float32 rounding: convolution kernels may sum in another order for another batch size.
        torch.testing.assert_close(u2[party], alone.forward({party: x0[party]})[party], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dx0[party], alone.backward({party: du2[party]})[party], rtol=1e-4, atol=1e-5)
        alone.build(config)  # the same start for the other hospital


def test_at_a_rounds_start_the_server_holds_enough_to_recompute_the_predictions(hospital_dirs):
    """What the design leaks (a measurement to make, not a defense): the server computed the average that every
    hospital starts the round with, so with the x0 it receives and the u2 it sends it can run the tail itself."""
    hospitals, server = _build(hospital_dirs)
    averaged = in_process.average_round(hospitals, round_index=0)
    hospital = hospitals["a"]
    x0 = hospital.forward()
    u2 = server.forward({"a": x0})["a"]
    server_tail = seeded_part("tail", FEATURES, seed=0)
    server_tail.load_state_dict(averaged["tail"])
    with torch.no_grad():
        recomputed = server_tail(u2, x0)
        own = hospital.tail(u2, hospital._x0)
    torch.testing.assert_close(recomputed, own)
