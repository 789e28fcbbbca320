from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext

from splitunet.filters import ChannelDropout, FeatureGuard
from splitunet.wire.protocol import MetaKey
from splitunet.wire.transport import control_dxo


def test_filters_record_their_passage_in_order(run_filter, features, through_fobs):
    shareable, _ = run_filter(ChannelDropout(rate=0.0), features)
    shareable = through_fobs(FeatureGuard().process(shareable, FLContext()))
    trail = from_shareable(shareable).get_meta_prop(MetaKey.FILTER_TRAIL)
    assert [record["filter"] for record in trail] == ["ChannelDropout", "FeatureGuard"]


def test_control_dxos_pass_untouched_and_uncounted():
    guard = FeatureGuard()
    out = from_shareable(guard.process(control_dxo({"plan": 1}).to_shareable(), FLContext()))
    assert out.meta == {"plan": 1} and guard.calls == 0


def test_an_unknown_kind_passes_with_a_warning(caplog):
    guard = FeatureGuard()
    weights = DXO(data_kind="WEIGHTS", data={"w": 1.0}).to_shareable()
    out = from_shareable(guard.process(weights, FLContext()))
    assert out.data == {"w": 1.0} and guard.calls == 0
    assert any("does not handle DXO kind 'WEIGHTS'" in record.getMessage() for record in caplog.records)
