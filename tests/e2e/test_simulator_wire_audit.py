"""Wire audit: every party records a digest of what it sends and receives; the records show what crossed.

Two tiny simulator runs with ``WireAudit`` in all four chains and the server's capture filter on every
iteration (:mod:`audited_run`): one with x0 withheld (``split_unet_no_x0``, shared with the defended-job tests),
one with every level sent (``split_unet``). The digests sent and received must match, no plaintext case ID may
cross, the server's workspace must hold no site image or encoder weight, and, with x0 withheld, no tensor may be a
copy of (or correlate strongly with) the site's crop or the labels. With x0 sent the correlation is reported: it
is the leak the paper studies.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from audited_run import AUDITED_ITERATIONS, audited_run
from tiny_job import tiny_server_args

from splitunet.checkpoint import load_checkpoint
from splitunet.evaluation.leakage import ACTIVATIONS, CapturedRun, GroundTruth
from splitunet.wire.protocol import DataKind

pytestmark = pytest.mark.e2e

ITERATIONS = AUDITED_ITERATIONS
# With x0 withheld, the finest level sent is x1 (half resolution, after two convolutions, instance norm and
# max-pooling). Channels that pass intensities through stay correlated with the down-sampled crop: with this
# test's secret the largest |r| over channels, sites and iterations was 0.89 (x1), 0.79 (x2), 0.79 (x3), against
# 0.93 for x0 when it is sent (0.85-0.89 for x1 with other secrets). Correlation is a blunt measure: x1 at 0.89
# still shows the anatomy to a white-box attacker (see `splitunet sweep`). The bound says only that nothing sent
# is the crop, the labels or a resampled copy of them.
MAX_CORRELATION_WITHOUT_X0 = 0.95
# With x0 sent, a channel of it follows the crop (or the mask) at least this closely; features that carried no
# image (zeros, noise) stay far below.
X0_CORRELATION_FLOOR = 0.8
# Levels with fewer voxels per crop are left out of the correlation: over 8 voxels (x4 of a 32^3 crop) the largest
# |r| of 16 random channels is near 1 by chance alone.
MIN_VOXELS = 64


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return audited_run(tmp_path_factory.mktemp("split_unet"), "split_unet")


def _audit(workspace: Path) -> dict[str, list[dict]]:
    records = {}
    for path in sorted((workspace / "simulator").rglob("audit/wire_*.jsonl")):
        party = path.stem.removeprefix("wire_")
        records[party] = [json.loads(line) for line in path.read_text().splitlines()]
    return records


def _digests(records, direction: str, kind: str, peer: str | None = None) -> Counter:
    return Counter(
        (entry["sha256"], entry["bytes"], tuple(entry["shape"]))
        for record in records
        if record["direction"] == direction and record["kind"] == kind and (peer is None or record["peer"] == peer)
        for entry in record["entries"].values()
    )


def test_every_party_audits_both_directions_and_the_digests_match(audited_no_x0_run):
    audit = _audit(audited_no_x0_run)
    sites = sorted(party for party in audit if party.startswith("site-"))
    assert sites == ["site-1", "site-2", "site-3", "site-4"] and len(audit) == 5
    server = next(records for party, records in audit.items() if not party.startswith("site-"))
    for site in sites:
        sent = _digests(audit[site], "out", DataKind.ACTIVATIONS)
        assert sum(sent.values()) >= 4 * ITERATIONS  # x1..x4 every iteration, plus validation windows
        assert sent == _digests(server, "in", DataKind.ACTIVATIONS, peer=site)
        assert _digests(server, "out", DataKind.GRADIENTS, peer=site) == _digests(audit[site], "in", DataKind.GRADIENTS)
        # What a site sends carries levels x1..x4 only: x0 never leaves it.
        keys = {key for r in audit[site] if r["direction"] == "out" and r["kind"] for key in r.get("entries", {})}
        assert keys == {"x1", "x2", "x3", "x4"}


def test_no_plaintext_case_id_crosses(audited_no_x0_run):
    audit_text = "".join(path.read_text() for path in (audited_no_x0_run / "simulator").rglob("audit/wire_*.jsonl"))
    case_ids = json.loads((audited_no_x0_run / "data" / "phantom_msd" / "dataset.json").read_text())["training"]
    names = [Path(case["image"]).name.split(".")[0] for case in case_ids]
    assert names and not [name for name in names if name in audit_text]
    run = CapturedRun(audited_no_x0_run)
    plan_keys = run.capture(ACTIVATIONS, "site-1", 1).plan["keys"]
    assert all(key in audit_text for key in plan_keys)  # keyed hashes cross instead


def test_server_workspace_holds_no_site_image_or_encoder_weight(audited_no_x0_run):
    simulator = audited_no_x0_run / "simulator"
    server_dir = simulator / "server"
    # The only volumes at the server are its own predicted segmentations, in the labels' values.
    for path in server_dir.rglob("*.nii*"):
        assert path.parent.name == "predictions", path
        values = set(np.unique(nib.load(path).get_fdata()).tolist())
        assert values <= {0.0, 1.0, 2.0, 3.0}, (path, values)
    site_weights = []
    checkpoints = audited_no_x0_run / "checkpoints"  # each party's checkpoint_dir, outside the simulator workspace
    for checkpoint in checkpoints.glob("site-*/**/encoder_*.pt"):
        site_weights += [t for t in load_checkpoint(checkpoint)["encoder"].values() if t.numel() > 1]
    assert site_weights
    server_files = [*server_dir.rglob("*.pt"), *(checkpoints / "server").rglob("*.pt")]
    assert any(path.name == "decoder_last.pt" for path in server_files)
    for path in server_files:
        state = load_checkpoint(path)
        tensors = []
        stack = [state]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                tensors.append(item)
            elif isinstance(item, dict):
                stack += list(item.values())
            elif isinstance(item, (list, tuple)):
                stack += list(item)
        for tensor in tensors:
            assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in site_weights), path


def _max_abs_correlation(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |Pearson r| between any feature channel and the reference resampled to the level's grid."""
    reference = F.adaptive_avg_pool3d(reference, features.shape[2:])
    ref = reference.flatten(2)
    ref = ref - ref.mean(-1, keepdim=True)
    feat = features.flatten(2)
    feat = feat - feat.mean(-1, keepdim=True)
    r = (feat * ref).sum(-1) / (feat.norm(dim=-1) * ref.norm(dim=-1)).clamp_min(1e-12)
    return float(r.abs().max())


def _correlations(workspace: Path) -> dict[str, float]:
    """Per level: the largest |r| of any captured activation channel with the site's crop or the WT mask."""
    run = CapturedRun(workspace)
    truth = GroundTruth(workspace / "data" / "parties", (workspace / "data" / "case_key_secret.txt").read_text())
    worst: dict[str, float] = {}
    for site, modality in run.sites.items():
        for iteration in run.iterations(ACTIVATIONS, site):
            capture = run.capture(ACTIVATIONS, site, iteration)
            image = truth.image_crops(modality, capture.plan)
            mask = truth.region_crops(capture.plan, "WT")
            for level, features in capture.observed.items():
                assert not any(features.shape == ref.shape and torch.equal(features, ref) for ref in (image, mask))
                if features[0, 0].numel() < MIN_VOXELS:
                    continue
                value = max(_max_abs_correlation(features, image), _max_abs_correlation(features, mask))
                worst[f"x{level}"] = max(worst.get(f"x{level}", 0.0), value)
    return worst


def test_without_x0_nothing_sent_correlates_strongly_with_the_crop_or_labels(audited_no_x0_run):
    worst = _correlations(audited_no_x0_run)
    print(f"largest |correlation| with the crop or WT mask, x0 withheld: {worst}")
    assert "x0" not in worst
    assert max(worst.values()) < MAX_CORRELATION_WITHOUT_X0


def test_with_x0_sent_the_correlation_is_reported(full_run):
    sent = _correlations(full_run)
    print(f"largest |correlation| with the crop or WT mask, every level sent: {sent}")
    assert set(sent) == {"x0", "x1", "x2", "x3"}  # x4 of a 32^3 crop has 8 voxels: left out
    # The full-resolution skip mirrors the crop: 0.91-0.93 in these runs. It is not compared with the no-x0 run's
    # levels: each run's sites draw private encoder seeds, and one such run's x1 reached 0.917 against the crop
    # pooled to its grid, so which run's largest |r| is higher is a draw, not a property of x0.
    assert sent["x0"] > X0_CORRELATION_FLOOR


@pytest.fixture(scope="module")
def protected_run(tmp_path_factory):
    return audited_run(tmp_path_factory.mktemp("split_unet_protected"), "split_unet_protected")


def test_the_protected_preset_sends_no_gradient_and_the_encoders_stay_as_initialised(protected_run):
    from splitunet.data.party_settings import SETTINGS_FILE_NAME, load_site_settings
    from splitunet.site.trainer import initial_encoder
    from splitunet.wire.model_config import SplitModelConfig

    audit = _audit(protected_run)
    server = next(records for party, records in audit.items() if not party.startswith("site-"))
    assert not _digests(server, "out", DataKind.GRADIENTS)
    settings_dir = protected_run / "simulator" / "local"
    assert (settings_dir / SETTINGS_FILE_NAME).is_file()
    config = SplitModelConfig(**{k: v for k, v in tiny_server_args().items() if k == "features"})
    for site in ("site-1", "site-2", "site-3", "site-4"):
        assert not _digests(audit[site], "in", DataKind.GRADIENTS)
        sent = {key for r in audit[site] if r["direction"] == "out" and r["kind"] for key in r.get("entries", {})}
        assert sent == {"x1", "x2", "x3", "x4"}
        # Nothing label-derived reached the site, so its encoder is exactly its private initialisation.
        settings = load_site_settings(site, settings_dir)
        assert settings.encoder_seed is not None
        expected = initial_encoder(config, settings.modality, settings.encoder_seed).state_dict()
        (saved,) = (protected_run / "checkpoints" / site).glob("**/encoder_*_last.pt")
        for name, tensor in load_checkpoint(saved)["encoder"].items():
            assert torch.equal(tensor, expected[name]), (site, name)
