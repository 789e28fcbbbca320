"""in_process.train_iteration's crossing: every tensor between a hospital and the server goes through it, in order,
and what it returns is what arrives."""

from __future__ import annotations

import pytest
import torch

from splitunet.data.hospital_folder import HospitalFolder
from splitunet.u_shape import in_process
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.hospital_trainer import HospitalTrainer
from splitunet.u_shape.server_trainer import MiddleTrainer

FEATURES = (2, 4, 4, 8, 8, 2)
CROP = (32, 32, 32)


@pytest.fixture
def build(tiny_parties):
    def _build():
        config = UShapeConfig(features=FEATURES, crop_size=CROP, batch_size=1, seed=3)
        hospital = HospitalTrainer(HospitalFolder(tiny_parties.parent / "msd", party="a"))
        hospital.build(config)
        server = MiddleTrainer("cpu")
        server.build(config)
        return {"a": hospital}, server

    return _build


def test_the_crossing_sees_each_tensor_in_order_and_an_unchanged_crossing_changes_nothing(build):
    seen = []

    def record(name, party, tensor):
        seen.append((name, party, tuple(tensor.shape)))
        return tensor

    hospitals, server = build()
    with_crossing = in_process.train_iteration(hospitals, server, record)
    plain_hospitals, plain_server = build()
    assert with_crossing == in_process.train_iteration(plain_hospitals, plain_server)
    # The steps taken after the backward passes are the same too.
    for ours, theirs in ((server.middle, plain_server.middle), (hospitals["a"].head, plain_hospitals["a"].head)):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b)
    half = tuple(s // 2 for s in CROP)
    one_iteration = [
        ("x0", "a", (1, FEATURES[0], *CROP)),
        ("u2", "a", (1, FEATURES[1], *half)),
        ("du2", "a", (1, FEATURES[1], *half)),
        ("dx0", "a", (1, FEATURES[0], *CROP)),
    ]
    assert seen == one_iteration
    assert tuple(name for name, _, _ in one_iteration) == in_process.CROSSINGS


def test_what_the_crossing_returns_is_what_arrives(build):
    hospitals, server = build()
    arrived = {}
    original_forward = server.forward

    def forward(x0_by_party):
        arrived["x0"] = x0_by_party["a"].clone()
        return original_forward(x0_by_party)

    server.forward = forward
    sent = {}

    def halve_x0(name, party, tensor):
        if name == "x0":
            sent["x0"] = tensor.clone()
            return tensor / 2
        return tensor

    in_process.train_iteration(hospitals, server, halve_x0)
    torch.testing.assert_close(arrived["x0"], sent["x0"] / 2)
