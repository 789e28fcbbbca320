import pytest
import torch

from splitunet.checkpoint import load_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.filters import CaptureFeatures, QuantizeFeatures
from splitunet.filters import capture_features as capture_module
from splitunet.wire.protocol import DataKind, MetaKey
from splitunet.wire.transport import dxo_to_features


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module, "run_dir", lambda fl_ctx: tmp_path)
    return tmp_path


def test_captures_chosen_iterations_as_received_and_passes_data_on_unchanged(run_filter, features, run_folder):
    capture = CaptureFeatures(iterations=[2], every=5)
    plan = {"keys": ["k"], "origins": [[0, 0, 0]], "size": [32, 32, 32], "flips": [[False] * 3]}
    for iteration in range(1, 11):
        _, dxo = run_filter(capture, features, meta={MetaKey.ITERATION: iteration, MetaKey.PLAN: plan})
        for level, tensor in dxo_to_features(dxo, DataKind.ACTIVATIONS).items():
            assert tensor.equal(features[level])
    files = sorted((run_folder / "captures" / DataKind.ACTIVATIONS).glob("*/iteration_*.pt"))
    assert [f.name for f in files] == ["iteration_000002.pt", "iteration_000005.pt", "iteration_000010.pt"]
    record = load_checkpoint(files[0])
    assert record["iteration"] == 2 and record["plan"] == plan and record["data_kind"] == DataKind.ACTIVATIONS
    assert record["features"]["x3"].equal(features[3])


def test_encoded_features_are_saved_decoded(run_filter, features, run_folder, through_fobs):
    from nvflare.apis.fl_context import FLContext

    quantized, _ = run_filter(QuantizeFeatures("int8"), features)
    CaptureFeatures(iterations=[1]).process(quantized, FLContext())
    record = load_checkpoint(next(run_folder.glob("captures/*/*/iteration_000001.pt")))
    assert record["features"]["x0"].dtype == torch.float32
    torch.testing.assert_close(record["features"]["x0"], features[0], atol=0.05, rtol=0)


def test_capture_count_is_bounded(run_filter, features, run_folder):
    capture = CaptureFeatures(iterations=[], every=1, max_captures=3)
    for iteration in range(1, 6):
        run_filter(capture, features, meta={MetaKey.ITERATION: iteration})
    assert len(list(run_folder.glob("captures/*/*/*.pt"))) == 3


@pytest.mark.parametrize("kwargs", [{"iterations": [], "every": 0}, {"every": -1}, {"max_captures": 0}])
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(SplitUNetConfigError):
        CaptureFeatures(**kwargs)
