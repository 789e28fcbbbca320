"""GradientDetector: honest segmentation gradients pass, FSHA's are refused through FLARE's filter path."""

import json
from contextlib import contextmanager

import pytest
import torch
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import GradientDetector
from splitunet.filters.gradient_detector import gradient_statistics
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES, SITE_ERROR_HEADER, DataKind, MetaKey
from splitunet.wire.transport import features_to_dxo

CROP = (32, 32, 32)


@contextmanager
def _one_thread():
    # Two torch threads on the shared 2-core CI machine are slower than one for these 3D convolutions.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def crops(tiny_parties):
    """Phantom crops, one channel per modality, with their TC/WT/ET regions: ``(images, targets)``."""
    from splitunet.data.party_data import LabelFolder, ModalityFolder
    from splitunet.evaluation.malicious_server import random_crops

    folders = [ModalityFolder(tiny_parties / m, m, party=f"site-{i + 1}") for i, m in enumerate(MODALITIES)]
    labels = LabelFolder(tiny_parties / "labels", "msd", party="server")
    return random_crops(folders, folders[0].case_ids, 6, CROP, seed=0, labels=labels)


def _scaled_noise(rms: dict[int, float], seed: int = 0) -> dict[int, torch.Tensor]:
    """White-noise gradients with the encoder's pyramid (8..128 channels, 32^3 .. 2^3) and a chosen rms per level."""
    generator = torch.Generator().manual_seed(seed)
    return {
        level: scale * torch.randn(1, 8 * 2**level, *(32 // 2**level,) * 3, generator=generator)
        for level, scale in rms.items()
    }


def _refusal(detector, grads, fl_ctx: FLContext | None = None) -> str | None:
    shareable = features_to_dxo(grads, DataKind.GRADIENTS, {"iteration": 1}).to_shareable()
    return detector.process(shareable, fl_ctx or FLContext()).get_header(SITE_ERROR_HEADER)


def _site_context(root) -> FLContext:
    """A site's filter context inside a FLARE workspace at ``root``."""
    from fakes import WorkspaceEngine
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.workspace import Workspace

    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, WorkspaceEngine(Workspace(str(root), "site-1")), private=True, sticky=False)
    return fl_ctx


_HONEST = {0: 100.0, 1: 30.0, 2: 10.0, 3: 3.0, 4: 1.0}
_FALLEN = {**_HONEST, 0: 1.0}  # x0 ratio 2 -> 0, inside a wide absolute band


def test_honest_gradients_pass_over_seeds_and_iterations(crops):
    from splitunet.evaluation.malicious_server import detector_gate, run_honest

    images, targets = crops
    with _one_thread():
        for seed in (0, 1):
            record = []
            run_honest(images, targets, iterations=2, seed=seed, gate=detector_gate(GradientDetector(), record))
            assert [entry["reason"] for entry in record] == [None] * 2, seed


def test_fsha_gradients_are_refused_through_the_filter_naming_the_statistic(crops, run_filter):
    from splitunet.evaluation.attacks.feature_space_hijacking import FeatureSpaceHijacking, SimulatedSite

    images, _ = crops
    config = SplitModelConfig(features=(4, 8, 16, 32, 64))  # narrow for speed; the critic's tell does not need width
    with _one_thread():
        site = SimulatedSite(config)
        attack = FeatureSpaceHijacking(config.features, config.sent_levels, width=8)
        for _ in range(2):  # the first answer and one after the critic's first update
            grads = attack.server_step(site.forward(images[:1, :1]), images[1:2, :1])
            shareable, dxo = run_filter(GradientDetector(), grads, kind=DataKind.GRADIENTS)
            message = shareable.get_header(SITE_ERROR_HEADER)
            assert dxo.data_kind == DataKind.CONTROL and not dxo.data
            assert "GradientDetector" in message and "suspicious gradients" in message
            assert "level_ratio x0" in message and "outside [-1.2, inf]" in message
            site.backward(grads)


def test_a_partial_hijack_with_zeros_elsewhere_is_refused_by_its_dc_share(crops):
    from splitunet.evaluation.attacks.feature_space_hijacking import FeatureSpaceHijacking, SimulatedSite

    images, _ = crops
    config = SplitModelConfig(features=(4, 8, 16, 32, 64))
    with _one_thread():
        site = SimulatedSite(config)
        attack = FeatureSpaceHijacking(config.features, config.sent_levels, levels=[0], width=8)
        grads = attack.server_step(site.forward(images[:1, :1]), images[1:2, :1])
    assert all(not grads[level].any() for level in (1, 2, 3, 4))
    # Ratios to a zero bottleneck are +inf, which the open upper bounds allow: the critic's DC share is the tell.
    message = _refusal(GradientDetector(), grads)
    assert "dc_fraction x0" in message and "> max_dc_fraction 0.02" in message


def test_a_hijacker_that_rescales_its_levels_to_honest_ratios_is_still_refused_by_its_dc_share(crops):
    # FSHA's level ratios reach honest values within about 15 iterations, and a server that knows the test can set
    # them at once (the ratios are its choice of scale per level); its critic's pooled gradient keeps its DC share.
    from splitunet.evaluation.attacks.feature_space_hijacking import FeatureSpaceHijacking, SimulatedSite

    images, _ = crops
    config = SplitModelConfig(features=(4, 8, 16, 32, 64))
    with _one_thread():
        site = SimulatedSite(config)
        attack = FeatureSpaceHijacking(config.features, config.sent_levels, width=8)
        grads = attack.server_step(site.forward(images[:1, :1]), images[1:2, :1])
    rms = {level: float(g.pow(2).mean().sqrt()) for level, g in grads.items()}
    honest_ratio = {0: 1.5, 1: 1.4, 2: 0.7, 3: -0.9}  # about the honest medians of the shipped job
    rescaled = {level: g * (10 ** honest_ratio.get(level, 0.0) * rms[4] / rms[level]) for level, g in grads.items()}
    stats = gradient_statistics({f"x{level}": g for level, g in rescaled.items()})
    assert all(stats["level_ratio"][f"x{l}"] == pytest.approx(r, abs=1e-3) for l, r in honest_ratio.items())  # noqa: E741
    message = _refusal(GradientDetector(), rescaled)
    assert "dc_fraction" in message and "max_dc_fraction" in message


def test_accepted_gradients_are_unchanged_and_the_meta_holds_only_settings(run_filter):
    grads = _scaled_noise({0: 100.0, 1: 30.0, 2: 10.0, 3: 3.0, 4: 1.0})
    shareable, dxo = run_filter(GradientDetector(), grads, kind=DataKind.GRADIENTS)
    assert shareable.get_header(SITE_ERROR_HEADER) is None
    for level, tensor in grads.items():
        assert dxo.data[f"x{level}"].equal(tensor)
    record = dxo.get_meta_prop(MetaKey.FILTER_TRAIL)[-1]
    settings = {"level_ratio_bounds", "max_dc_fraction", "drift_threshold", "warmup", "history"}
    assert set(record) - {"filter", "party", "call", "bytes_in", "bytes_out"} == settings
    assert record["level_ratio_bounds"]["x0"] == [-1.2, None]  # JSON-safe open bound
    json.dumps(record)


def test_statistics_of_constructed_gradients():
    grads = _scaled_noise({0: 100.0, 3: 1.0, 4: 1.0})
    grads[3] = grads[3] * 0 + 1.0  # constant over space: all of its energy is in the channel means
    stats = gradient_statistics({f"x{level}": t for level, t in grads.items()})
    assert stats["level_ratio"]["x0"] == pytest.approx(2.0, abs=0.01)
    assert stats["dc_fraction"]["x3"] == pytest.approx(1.0)
    assert stats["dc_fraction"]["x0"] < 1e-3  # white noise: about 1 / 32^3
    zero = gradient_statistics({"x0": torch.zeros(1, 8, 32, 32, 32), "x4": grads[4]})
    assert zero["level_ratio"]["x0"] == float("-inf")


def test_drift_refuses_a_sudden_fall_after_warmup_and_keeps_refused_calls_out_of_the_baseline():
    honest, fallen = _HONEST, _FALLEN
    detector = GradientDetector(level_ratio_bounds={}, drift_threshold=1.5, warmup=3)
    assert _refusal(detector, _scaled_noise(fallen)) is None  # no baseline yet: nothing to drift from
    for seed in range(3):
        assert _refusal(detector, _scaled_noise(honest, seed)) is None
    message = _refusal(detector, _scaled_noise(fallen, 9))
    assert "drift of level_ratio x0" in message and "drift_threshold 1.5" in message
    assert detector.calls == 4 and detector.refusals == 1
    # The median of the accepted calls (2, 2, 2 and one 0) still refuses the fall: refusals never enter it.
    assert "drift" in _refusal(detector, _scaled_noise(fallen, 10))
    assert _refusal(GradientDetector(level_ratio_bounds={}, drift_threshold=None), _scaled_noise(fallen)) is None


def _drift_detector(**kwargs) -> GradientDetector:
    return GradientDetector(level_ratio_bounds={}, drift_threshold=1.5, warmup=3, **kwargs)


def test_a_restarted_job_keeps_the_sites_drift_baseline(tmp_path):
    # A server that stops and resumes the job gets a new filter instance; without the saved baseline its first
    # `warmup` calls would meet only the absolute bounds (here none), and the fall below would pass.
    fl_ctx = _site_context(tmp_path / "site-1")
    first_job = _drift_detector()
    for seed in range(3):
        assert _refusal(first_job, _scaled_noise(_HONEST, seed), fl_ctx) is None
    saved = tmp_path / "site-1" / GradientDetector.DEFAULT_BASELINE_FILE
    assert saved.is_file() and len(json.loads(saved.read_text())["accepted"]) == 3

    resumed = _drift_detector()
    message = _refusal(resumed, _scaled_noise(_FALLEN, 9), _site_context(tmp_path / "site-1"))
    assert "drift of level_ratio x0" in message and "median of 3 accepted calls" in message
    assert resumed.baseline == first_job.baseline
    # What the file closes: the same restart with the baseline in memory only lets the fall through.
    assert _refusal(_drift_detector(baseline_file=None), _scaled_noise(_FALLEN, 9), fl_ctx) is None


def test_the_saved_baseline_keeps_the_last_history_calls_and_an_absolute_path_needs_no_workspace(tmp_path):
    path = tmp_path / "elsewhere" / "baseline.json"
    detector = GradientDetector(level_ratio_bounds={}, warmup=2, history=3, baseline_file=str(path))
    for seed in range(5):
        assert _refusal(detector, _scaled_noise(_HONEST, seed)) is None
    assert len(json.loads(path.read_text())["accepted"]) == 3
    shorter = GradientDetector(level_ratio_bounds={}, warmup=2, history=2, baseline_file=str(path))
    assert _refusal(shorter, _scaled_noise(_HONEST, 7)) is None
    assert shorter.baseline[:1] == detector.baseline[-1:] and len(shorter.baseline) == 2


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"version": 1, "accepted": [{"x0": "high"}]}), json.dumps({"accepted": []})],
)
def test_an_unreadable_baseline_refuses_every_gradient_naming_no_path_and_stays_as_it_was(tmp_path, content):
    root = tmp_path / "site-1"
    saved = root / GradientDetector.DEFAULT_BASELINE_FILE
    saved.parent.mkdir(parents=True)
    saved.write_text(content)
    detector = _drift_detector()
    for seed in range(2):
        message = _refusal(detector, _scaled_noise(_HONEST, seed), _site_context(root))
        assert "saved drift baseline cannot be read" in message and str(tmp_path) not in message
    assert detector.refusals == 2 and saved.read_text() == content


def test_a_baseline_that_cannot_be_saved_refuses_the_gradient_naming_no_path(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    detector = _drift_detector(baseline_file=str(blocked / "baseline.json"))
    message = _refusal(detector, _scaled_noise(_HONEST))
    assert "cannot save its drift baseline" in message and str(tmp_path) not in message
    assert detector.refusals == 1 and detector.baseline == []


def test_outside_flare_a_relative_baseline_stays_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    detector = _drift_detector()
    assert _refusal(detector, _scaled_noise(_HONEST)) is None
    assert len(detector.baseline) == 1 and list(tmp_path.iterdir()) == []


def test_activations_are_not_checked(run_filter):
    features = _scaled_noise({0: 1.0, 4: 100.0})  # would break the x0 ratio bound as gradients
    shareable, dxo = run_filter(GradientDetector(), features, kind=DataKind.ACTIVATIONS)
    assert shareable.get_header(SITE_ERROR_HEADER) is None and dxo.data["x0"].equal(features[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"level_ratio_bounds": {"x0": [1.0, 0.0]}},
        {"level_ratio_bounds": {"x4": [0.0, 1.0]}},
        {"level_ratio_bounds": {"x9": [0.0, 1.0]}},
        {"level_ratio_bounds": {"x0": "low"}},
        {"level_ratio_bounds": [0.0, 1.0]},
        {"max_dc_fraction": 0.0},
        {"max_dc_fraction": 1.5},
        {"max_dc_fraction": {"x0": -1}},
        {"drift_threshold": 0},
        {"drift_threshold": True},
        {"warmup": 0},
        {"warmup": 10, "history": 5},
        {"baseline_file": ""},
        {"baseline_file": 3},
    ],
)
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(SplitUNetConfigError):
        GradientDetector(**kwargs)


def test_the_detector_imports_nothing_a_site_must_not_load():
    # A static check of every import in the module (function-level ones too); the rest of what a site loads with
    # a filter (filters.base, wire) is what tests/test_boundaries.py checks in a fresh interpreter.
    import ast

    import splitunet.filters.gradient_detector as module

    tree = ast.parse(open(module.__file__).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    ours = sorted(name for name in imported if name.startswith("splitunet"))
    assert ours == [
        "splitunet.atomic_files",
        "splitunet.errors",
        "splitunet.filters.base",
        "splitunet.wire.codec",
        "splitunet.wire.protocol",
    ]


def test_int8_gradients_of_the_main_job_are_judged_decoded_and_passed_on_encoded():
    from splitunet.filters import QuantizeFeatures

    honest = _scaled_noise({0: 100.0, 1: 30.0, 2: 10.0, 3: 3.0, 4: 1.0})
    hijacked = _scaled_noise({0: 0.01, 1: 30.0, 2: 10.0, 3: 3.0, 4: 1.0})
    for grads, refused in ((honest, False), (hijacked, True)):
        shareable = features_to_dxo(grads, DataKind.GRADIENTS, {"iteration": 1}).to_shareable()
        shareable = QuantizeFeatures(precision="int8").process(shareable, FLContext())
        out = GradientDetector().process(shareable, FLContext())
        message = out.get_header(SITE_ERROR_HEADER)
        assert (message is not None) == refused, message
        if refused:
            assert "level_ratio x0" in message
        else:
            assert out is shareable or out.get_header(SITE_ERROR_HEADER) is None
