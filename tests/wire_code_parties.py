"""One T1 site and a one-site server on the tiny phantom, for the tests of codes made on the sender's device
(tests/site/test_site_wire_codes.py, tests/server/test_server_wire_codes.py)."""

from __future__ import annotations

import torch

from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.data.sampling import window_plan
from splitunet.server.trainer import ServerTrainer
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.codec import EncodedLevel, quantize_affine
from splitunet.wire.model_config import SplitModelConfig

SECRET = "test-secret"
CONFIG = SplitModelConfig(features=(4, 8, 8, 16, 16), skip_levels=(0, 1, 2, 3), learning_rate=5e-3, seed=4)


def t1_site(tiny_parties, device="cpu", wire_bits=None) -> SiteTrainer:
    """The T1 site (site-2), its encoder built from :data:`CONFIG` under the global seed 0."""
    site = SiteTrainer(ModalityFolder(tiny_parties / "t1", "t1", party="site-2"), SECRET, device)
    torch.manual_seed(0)
    site.build(CONFIG)
    site.wire_bits = wire_bits
    return site


def one_site_server(tiny_parties, device="cpu", wire_bits=None) -> ServerTrainer:
    """The label holder with a decoder for one site, built under the global seed 0."""
    server = ServerTrainer(LabelFolder(tiny_parties / "labels", party="server"), SECRET, device)
    torch.manual_seed(0)
    server.build(CONFIG, num_sites=1)
    server.wire_bits = wire_bits
    return server


def two_crop_plan(site: SiteTrainer) -> dict:
    """Crops of the site's first two cases, one of them flipped."""
    keys = sorted(site.key_to_case)[:2]
    plan = window_plan(keys, [[0, 2, 1], [1, 0, 0]], [32, 32, 32])
    plan["flips"] = [[False, True, False], [False, False, False]]
    return plan


def assert_host_codec(coded, dense) -> None:
    """``coded`` (level -> codes made on the sender's device) holds exactly the int8 host codec of ``dense``."""
    assert sorted(coded) == sorted(dense) == [0, 1, 2, 3, 4]
    for level, tensor in dense.items():
        payload, encoding = quantize_affine(tensor, 8)
        assert isinstance(coded[level], EncodedLevel)
        assert torch.equal(coded[level].payload, payload)
        for name in ("low", "step"):
            assert torch.equal(coded[level].encoding[name], encoding[name])
