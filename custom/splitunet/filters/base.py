"""What every Split-U-Net privacy filter shares: which DXOs it touches, how it reports, how it refuses.

A filter acts on the feature DXOs of this bundle (site -> server activations, server -> site gradients), level
by level. Each call is counted and logged with what the filter did, and a short record of data-independent facts
(filter, party, call number, settings, bytes) is appended to the DXO meta so the receiver knows which defenses
the data went through. Data-dependent statistics (norms, fractions clipped) are logged locally only: they would
leak through the meta.

A filter that must refuse data (the guard, a misordered chain) raises :class:`FilterRejection`; the filter then
turns the message into the task's error reply, naming the parties and the filter, so the server's run stops
with that message instead of FLARE's bare ``TASK_RESULT_FILTER_ERROR``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import torch
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from splitunet.errors import SplitUNetConfigError
from splitunet.wire.codec import ENCODING_META_KEY
from splitunet.wire.protocol import NUM_LEVELS, SITE_ERROR_HEADER, DataKind, MetaKey, level_index
from splitunet.wire.transport import payload_bytes, register_tensor_support

__all__ = ["FeatureFilter", "FilterRejection", "FEATURE_KINDS"]

# The DXO kinds that carry feature tensors.
FEATURE_KINDS = (DataKind.ACTIVATIONS, DataKind.GRADIENTS)
_OUR_KINDS = FEATURE_KINDS + (DataKind.CONTROL,)


class FilterRejection(ValueError):
    """The filter refuses this DXO; the message says why."""


def _validate_levels(levels: Iterable[int] | None, name: str) -> tuple[int, ...] | None:
    if levels is None:
        return None
    try:
        chosen = tuple(sorted({int(level) for level in levels}))
    except (TypeError, ValueError):
        raise SplitUNetConfigError(f"{name}: levels must be a list of ints, got {levels!r}") from None
    if not chosen or any(not 0 <= level < NUM_LEVELS for level in chosen):
        raise SplitUNetConfigError(f"{name}: levels must be a non-empty list within 0..{NUM_LEVELS - 1}, got {levels}")
    return chosen


def _validate_kinds(data_kinds: Sequence[str] | None, name: str) -> list[str]:
    kinds = list(data_kinds or FEATURE_KINDS)
    unknown = [kind for kind in kinds if kind not in FEATURE_KINDS]
    if unknown:
        raise SplitUNetConfigError(f"{name}: data_kinds must be among {list(FEATURE_KINDS)}, got {unknown}")
    return kinds


class FeatureFilter(DXOFilter):
    """Base of the bundle's privacy filters on activation and gradient DXOs.

    Subclasses implement :meth:`filter_features`, which gets the DXO's level tensors and returns the new
    ones plus a dictionary of public facts for the DXO meta and a log message.

    Args:
        levels: skip levels (0..4) to act on; ``None``: every level in the DXO.
        data_kinds: feature kinds to act on (``"splitunet_activations"``, ``"splitunet_gradients"``); default
            both, so one filter class serves a site's results and the server's outgoing gradients.
        log_every: log one line every this many calls (1: every call).
    """

    # Encoding filters (quantization, sparsification) must come last; others refuse encoded levels.
    accepts_encoded = False
    # FLARE runs the server's task-data filters concurrently, one thread per site request. A filter whose
    # filter_features reads or changes state shared across calls (a random generator, a release count that its
    # epsilon composes, a capture budget) sets this, and its calls then run one at a time.
    stateful = False

    def __init__(
        self, levels: Iterable[int] | None = None, data_kinds: Sequence[str] | None = None, log_every: int = 1
    ):
        name = type(self).__name__
        kinds = _validate_kinds(data_kinds, name)
        super().__init__(supported_data_kinds=list(FEATURE_KINDS), data_kinds_to_filter=kinds)
        self.levels = _validate_levels(levels, name)
        if not isinstance(log_every, int) or log_every < 1:
            raise SplitUNetConfigError(f"{name}: log_every must be an int >= 1, got {log_every!r}")
        self.log_every = log_every
        self.calls = 0  # completed calls; inside a stateful filter's filter_features, self.calls + 1 is this one
        self._lock = threading.Lock()
        self._warned_kinds: set[str] = set()

    # ------------------------------------------------------------------------------------------ subclass API
    def filter_features(
        self, features: dict[str, torch.Tensor], dxo: DXO, fl_ctx: FLContext
    ) -> tuple[dict[str, torch.Tensor], dict, str]:
        """Transform the chosen levels.

        Args:
            features: level key -> tensor, only the levels this filter acts on.
            dxo: the whole DXO (read its meta; do not modify it).
            fl_ctx: FLARE context.

        Returns:
            ``(new_features, public_facts, log_message)``. A level missing from ``new_features`` is removed
            from the DXO.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ FLARE hooks
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        register_tensor_support()
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO (e.g. an error reply): nothing of ours to filter
            return shareable
        if dxo.data_kind not in _OUR_KINDS and dxo.data_kind not in self._warned_kinds:
            self._warned_kinds.add(dxo.data_kind)
            self.log_warning(
                fl_ctx, f"{type(self).__name__} does not handle DXO kind {dxo.data_kind!r}; passed it on unchanged"
            )
        try:
            return super().process(shareable, fl_ctx)
        except FilterRejection as error:
            return self._reject(shareable, str(error), fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        where = self.describe_route(fl_ctx)
        iteration = (dxo.meta or {}).get(MetaKey.ITERATION)
        keys = self._selected_keys(dxo)
        encodings = dict((dxo.meta or {}).get(ENCODING_META_KEY) or {})
        if not self.accepts_encoded:
            encoded = sorted(set(keys) & set(encodings))
            if encoded:
                raise FilterRejection(
                    f"{type(self).__name__} got {encoded} already encoded ({encodings[encoded[0]]['scheme']}) by an "
                    f"earlier filter; encoding filters (QuantizeFeatures, TopKSparsify) must come last in a chain, "
                    f"and a site's scope filters run before the job's"
                )
        bytes_in = payload_bytes(dxo)
        selected = {k: dxo.data[k] for k in keys}
        if self.stateful:
            with self._lock:
                new_features, facts, message = self.filter_features(selected, dxo, fl_ctx)
                self.calls += 1
                call = self.calls
        else:
            new_features, facts, message = self.filter_features(selected, dxo, fl_ctx)
            with self._lock:
                self.calls += 1
                call = self.calls
        data = {k: v for k, v in dxo.data.items() if k not in keys}
        data.update(new_features)
        meta = dict(dxo.meta or {})
        new_encodings = dict(meta.get(ENCODING_META_KEY) or {})
        for key in keys:
            if key not in new_features:
                new_encodings.pop(key, None)
        new_encodings.update(facts.pop("encodings", {}))
        if new_encodings:
            meta[ENCODING_META_KEY] = new_encodings
        else:
            meta.pop(ENCODING_META_KEY, None)
        result = DXO(data_kind=dxo.data_kind, data=data, meta=meta)
        bytes_out = payload_bytes(result)
        record = {"filter": type(self).__name__, "party": fl_ctx.get_identity_name(), "call": call}
        record.update(facts, bytes_in=bytes_in, bytes_out=bytes_out)
        result.meta[MetaKey.FILTER_TRAIL] = list(meta.get(MetaKey.FILTER_TRAIL) or []) + [record]
        if call % self.log_every == 0 or call == 1:
            at = f"iteration {iteration}" if iteration is not None else "inference"
            self.log_info(
                fl_ctx,
                f"{type(self).__name__} call {call} ({where}, {dxo.data_kind}, {at}): {message}; "
                f"bytes {bytes_in} -> {bytes_out}",
            )
        return result

    # ------------------------------------------------------------------------------------------ helpers
    def _selected_keys(self, dxo: DXO) -> list[str]:
        keys = sorted(dxo.data)
        for key in keys:
            try:
                level_index(key)
            except ValueError:
                raise FilterRejection(f"unexpected entry {key!r} in {dxo.data_kind}") from None
        if self.levels is None:
            return keys
        return [k for k in keys if level_index(k) in self.levels]

    @staticmethod
    def describe_route(fl_ctx: FLContext) -> str:
        """``"site-1 -> server"``-style description of where the data being filtered goes."""
        me = fl_ctx.get_identity_name() or "?"
        peer_ctx = fl_ctx.get_peer_context()
        peer = peer_ctx.get_identity_name() if peer_ctx is not None else None
        direction = fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION)
        if peer is None or peer == me:
            return f"at {me}"
        return f"{peer} -> {me}" if direction == FilterKey.IN else f"{me} -> {peer}"

    def _reject(self, shareable: Shareable, reason: str, fl_ctx: FLContext) -> Shareable:
        message = f"{type(self).__name__} ({self.describe_route(fl_ctx)}) rejected the data: {reason}"
        # FLARE streams error logs as events through the engine; a filter run outside FLARE (the evaluation's
        # simulated sites) has none, and firing would only log "no engine in fl_ctx" after every refusal.
        self.log_error(fl_ctx, message, fire_event=fl_ctx.get_engine() is not None)
        # The same Shareable keeps FLARE's task headers; only its payload and return code change.
        DXO(data_kind=DataKind.CONTROL, data={}, meta={}).update_shareable(shareable)
        shareable.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
        shareable.set_header(SITE_ERROR_HEADER, message)
        return shareable
