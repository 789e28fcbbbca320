import pytest
import torch

from splitunet.checkpoint import load_checkpoint, save_checkpoint
from splitunet.evaluation.attacks import check_observed, level_sizes, observed_from_capture, resolve_crop_size


def _features(size=(33, 34, 35), channels=(2, 2, 4, 4, 8), batch=2):
    sizes = level_sizes(size)
    return {f"x{level}": torch.randn(batch, c, *sizes[level]) for level, c in enumerate(channels)}


def test_a_capture_file_becomes_observed_tensors_and_a_plan(tmp_path):
    # As CaptureFeatures writes it (splitunet/filters/capture_features.py), read back with weights_only loading.
    plan = {"keys": ["k1", "k2"], "origins": [[0, 0, 0], [1, 2, 3]], "size": [33, 34, 35], "flips": [[False] * 3] * 2}
    features = {key: t.half() for key, t in _features().items() if key != "x0"}
    record = {
        "features": features,
        "data_kind": "splitunet_activations",
        "site": "site-1",
        "iteration": 1,
        "plan": plan,
        "filter_trail": [{"filter": "BlockSkipLevels@site-1", "levels": [0]}],
    }
    path = save_checkpoint(record, tmp_path / "captures" / "splitunet_activations" / "site-1" / "iteration_000001.pt")
    observed, loaded_plan = observed_from_capture(load_checkpoint(path))
    assert sorted(observed) == [1, 2, 3, 4]
    assert all(t.dtype == torch.float32 for t in observed.values())
    torch.testing.assert_close(observed[2], features["x2"].float())
    assert loaded_plan == plan
    assert resolve_crop_size(observed, loaded_plan["size"]) == (33, 34, 35)


def test_level_sizes_halve_with_floor():
    assert level_sizes((33, 34, 35)) == [(33, 34, 35), (16, 17, 17), (8, 8, 8), (4, 4, 4), (2, 2, 2)]


def test_crop_size_is_read_from_x0_or_assumed_even_from_a_coarser_level():
    features = check_observed(_features(size=(32, 32, 30)))
    assert resolve_crop_size(features) == (32, 32, 30)
    assert resolve_crop_size({2: features[2]}) == (32, 32, 28)  # 8x8x7 * 4: pass the plan's size instead
    with pytest.raises(ValueError, match=r"level x2 has spatial size \(8, 8, 7\)"):
        resolve_crop_size({2: features[2]}, (32, 32, 32))


def test_observed_tensors_are_detached_float32_copies():
    source = {0: torch.ones(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)}
    checked = check_observed(source)
    assert checked[0].dtype == torch.float32 and not checked[0].requires_grad
    checked[0].zero_()
    assert source[0].detach().eq(1).all()


@pytest.mark.parametrize(
    "observed, message",
    [
        ({}, "non-empty"),
        ({5: torch.zeros(1, 1, 2, 2, 2)}, "0..4"),
        ({"y0": torch.zeros(1, 1, 2, 2, 2)}, "level key"),
        ({0: torch.zeros(1, 2, 2, 2)}, r"\(B, C, D, H, W\)"),
        ({0: torch.zeros(1, 1, 2, 2, 2, dtype=torch.int32)}, "floating point"),
        ({0: torch.full((1, 1, 2, 2, 2), float("nan"))}, "NaN"),
        ({0: torch.zeros(1, 1, 4, 4, 4), 1: torch.zeros(2, 1, 2, 2, 2)}, "batch sizes"),
        ({0: torch.zeros(1, 1, 2, 2, 2), "x0": torch.zeros(1, 1, 2, 2, 2)}, "twice"),
    ],
)
def test_malformed_observations_are_refused(observed, message):
    with pytest.raises(ValueError, match=message):
        check_observed(observed)


def test_a_record_without_features_is_refused():
    with pytest.raises(ValueError, match="'features'"):
        observed_from_capture({"plan": {}})
