import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.filters import BlockSkipLevels
from splitunet.wire.protocol import DataKind, MetaKey
from splitunet.wire.transport import control_dxo, dxo_to_features


def test_blocked_levels_never_leave_and_the_rest_is_untouched(run_filter, features):
    _, dxo = run_filter(BlockSkipLevels(levels=[0, 1]), features)
    assert sorted(dxo.data) == ["x2", "x3", "x4"]
    for key in ("x2", "x3", "x4"):
        assert dxo.data[key].equal(features[int(key[1])])


def test_setup_reply_announces_the_blocked_levels():
    reply = control_dxo({MetaKey.MODALITY: "flair", MetaKey.CASES: {}}).to_shareable()
    marked = from_shareable(BlockSkipLevels(levels=[0]).process(reply, FLContext()))
    assert marked.get_meta_prop(MetaKey.BLOCKED_LEVELS) == [0]
    # Other control DXOs (plans, acknowledgements) are left alone.
    ack = from_shareable(BlockSkipLevels(levels=[0]).process(control_dxo({"x": 1}).to_shareable(), FLContext()))
    assert ack.get_meta_prop(MetaKey.BLOCKED_LEVELS) is None


def test_receiver_expecting_the_blocked_level_gets_a_clear_error(run_filter, features):
    _, dxo = run_filter(BlockSkipLevels(levels=[0]), features)
    with pytest.raises(ValueError, match=r"site-1 sent levels \['x1', 'x2', 'x3', 'x4'\].*expected.*'x0'.*skip_levels"):
        dxo_to_features(dxo, DataKind.ACTIVATIONS, party="site-1", expected_levels=range(5))


def test_gradients_pass_untouched(run_filter, features):
    _, dxo = run_filter(BlockSkipLevels(levels=[0]), features, kind=DataKind.GRADIENTS)
    assert sorted(dxo.data) == ["x0", "x1", "x2", "x3", "x4"]


def test_the_bottleneck_cannot_be_blocked():
    with pytest.raises(SplitUNetConfigError, match="bottleneck"):
        BlockSkipLevels(levels=[4])
