"""Refuse malformed, non-finite or oversized feature tensors, in either direction."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from splitunet.errors import SplitUNetConfigError
from splitunet.filters.base import FeatureFilter, FilterRejection
from splitunet.wire.codec import ENCODING_META_KEY, affine_layout, affine_value_check, decode_entry, entry_bytes
from splitunet.wire.protocol import level_index

__all__ = ["FeatureGuard"]

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# FLARE's largest message is near 2 GiB (docs/design.md, "FLARE facts"); stay below it with room for headers.
_DEFAULT_MAX_BYTES = 1_800_000_000


class FeatureGuard(FeatureFilter):
    """Check every feature DXO before it is sent or used, and stop the run with a clear message if it is bad.

    Checks: each level is a ``(B, C, D, H, W)`` tensor of an allowed float dtype (or a known wire encoding of
    one), all levels have the same batch size, each coarser level is the finer one halved (as the encoder's
    pooling makes them), values are finite and, optionally, bounded, and the DXO is within ``max_bytes``. Put it
    on the sending side to stop a bad release leaving a party, and on the receiving side to protect the model
    from a faulty or malicious peer.

    Affine integer codes are checked without decoding them: codes and scales against their description
    (:func:`~splitunet.wire.codec.affine_layout`: ``uint8`` codes of the described shape, ``(B, C)`` scales, no
    negative step), then the values they decode to from the codes and scales alone
    (:func:`~splitunet.wire.codec.affine_value_check`, exact: the same counts and magnitudes as decoding gives).
    Other encodings (top-k) are decoded to be checked.

    Args:
        max_bytes: largest DXO payload in bytes.
        max_abs: largest absolute value allowed (``None``: only finiteness is checked).
        allowed_dtypes: dense float dtypes accepted (names as in torch).
        expected_channels: channels per level, e.g. ``[8, 16, 32, 64, 128]`` (``None``: not checked).
        data_kinds: feature kinds to check (default activations and gradients).
        log_every: log one line every this many calls (rejections are always logged).
    """

    accepts_encoded = True

    def __init__(
        self,
        max_bytes: int = _DEFAULT_MAX_BYTES,
        max_abs: float | None = None,
        allowed_dtypes: Sequence[str] = _FLOAT_DTYPES,
        expected_channels: Sequence[int] | None = None,
        data_kinds: Sequence[str] | None = None,
        log_every: int = 1,
    ):
        super().__init__(levels=None, data_kinds=data_kinds, log_every=log_every)
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise SplitUNetConfigError(f"FeatureGuard: max_bytes must be an int >= 1, got {max_bytes!r}")
        if max_abs is not None and not max_abs > 0:
            raise SplitUNetConfigError(f"FeatureGuard: max_abs must be > 0 or null, got {max_abs}")
        unknown = [d for d in allowed_dtypes if d not in _FLOAT_DTYPES]
        if unknown or not allowed_dtypes:
            raise SplitUNetConfigError(
                f"FeatureGuard: allowed_dtypes must be among {_FLOAT_DTYPES}, got {allowed_dtypes}"
            )
        self.max_bytes = max_bytes
        self.max_abs = None if max_abs is None else float(max_abs)
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.expected_channels = None if expected_channels is None else [int(c) for c in expected_channels]

    def filter_features(self, features: dict[str, torch.Tensor], dxo: DXO, fl_ctx: FLContext):
        encodings = (dxo.meta or {}).get(ENCODING_META_KEY) or {}
        total = sum(entry_bytes(t, encodings.get(k)) for k, t in features.items())
        if total > self.max_bytes:
            raise FilterRejection(f"{total} bytes exceed max_bytes {self.max_bytes}")
        shapes = {}
        for key, payload in features.items():
            if not isinstance(payload, torch.Tensor):
                raise FilterRejection(f"{key} is a {type(payload).__name__}, not a tensor")
            shapes[key] = self._check_level(key, payload, encodings.get(key))
        self._check_pyramid(shapes)
        return dict(features), {}, f"checked {sorted(features)}: shapes, dtypes, finite values, {total} bytes"

    def _check_level(self, key: str, payload: torch.Tensor, encoding) -> tuple[int, ...]:
        codes = bool(encoding) and encoding.get("scheme") == "affine"
        if codes:
            try:
                shape, dtype = affine_layout(payload, encoding)
            except ValueError as error:
                raise FilterRejection(f"{key} has a malformed affine encoding: {error}") from None
            values = None
        elif encoding:
            shape = tuple(int(s) for s in encoding.get("shape", ()))
            dtype = str(encoding.get("dtype"))
            try:
                # Decoding is cheap next to the model, and checks the payload against its description.
                values = decode_entry(payload, encoding)
            except Exception as error:  # noqa: BLE001 - any decoding failure means a malformed entry
                raise FilterRejection(f"{key} has a malformed {encoding.get('scheme')} encoding: {error}") from None
        else:
            shape, dtype, values = tuple(payload.shape), str(payload.dtype).removeprefix("torch."), payload
        if len(shape) != 5:
            raise FilterRejection(f"{key} has shape {shape}; expected (B, C, D, H, W)")
        if dtype not in self.allowed_dtypes:
            raise FilterRejection(f"{key} has dtype {dtype}; allowed: {list(self.allowed_dtypes)}")
        if values is not None and tuple(values.shape) != shape:
            raise FilterRejection(f"{key} decodes to shape {tuple(values.shape)}, but is described as {shape}")
        numel = math.prod(shape)
        if codes:
            bad, largest = affine_value_check(payload, encoding, largest=self.max_abs is not None)
        else:
            finite = torch.isfinite(values)
            bad = 0 if bool(finite.all()) else int((~finite).sum())
            largest = float(values.abs().max()) if self.max_abs is not None and numel and not bad else None
        if bad:
            raise FilterRejection(f"{key} holds {bad} NaN/Inf values of {numel}")
        if largest is not None and largest > self.max_abs:
            raise FilterRejection(f"{key} holds |value| {largest:.4g} > max_abs {self.max_abs:g}")
        if self.expected_channels is not None:
            level = level_index(key)
            if level < len(self.expected_channels) and shape[1] != self.expected_channels[level]:
                raise FilterRejection(f"{key} has {shape[1]} channels; expected {self.expected_channels[level]}")
        return shape

    @staticmethod
    def _check_pyramid(shapes: dict[str, tuple[int, ...]]) -> None:
        ordered = sorted(shapes.items(), key=lambda item: level_index(item[0]))
        for (fine_key, fine), (coarse_key, coarse) in zip(ordered, ordered[1:]):
            if fine[0] != coarse[0]:
                raise FilterRejection(f"{fine_key} has batch size {fine[0]} but {coarse_key} has {coarse[0]}")
            factor = 2 ** (level_index(coarse_key) - level_index(fine_key))
            expected = tuple(math.floor(s / factor) for s in fine[2:])
            if tuple(coarse[2:]) != expected:
                raise FilterRejection(
                    f"{coarse_key} has spatial size {tuple(coarse[2:])}; "
                    f"{fine_key} {tuple(fine[2:])} implies {expected}"
                )
