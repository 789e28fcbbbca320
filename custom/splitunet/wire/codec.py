"""Compact encodings of feature tensors on the wire, self-described in the DXO so any receiver can decode them.

A filter that encodes a level (quantization to a few bits, top-k sparsification) replaces the level's tensor in
the DXO data by its payload and records how to decode it under ``meta[ENCODING_META_KEY][level_key]``.
:func:`splitunet.wire.transport.dxo_to_features` decodes every such entry, so the decoder (and the sites' encoders
receiving gradients) always see dense float tensors, and a receiver needs no filter paired with the sender's:
a site's privacy policy may quantize without the job knowing.

A sender on a GPU encodes before its device-to-host copy (:class:`EncodedLevel`), so only the codes and their
scales cross PCIe; a receiver on a GPU copies them over and decodes on its device. The functions run on the tensor's
own device and give the same bits on a CUDA device as on the CPU: every step is an exactly rounded IEEE operation
(minimum, maximum, subtraction, true division, round-half-to-even, multiply, add), none of them fused.

Plain torch, no FLARE: the same functions are tested and benchmarked in one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ENCODING_META_KEY",
    "SENDER_ENCODED_META_KEY",
    "AFFINE_BITS",
    "EncodedLevel",
    "affine_layout",
    "affine_value_check",
    "quantize_affine",
    "dequantize_affine",
    "sparsify_top_k",
    "densify_top_k",
    "decode_entry",
    "tensor_bytes",
    "entry_bytes",
]

# Key of the DXO meta dictionary that maps level keys to their encodings.
ENCODING_META_KEY = "splitunet_encoding"
# Key of the DXO meta dictionary that names the levels a site's trainer encoded on its device for the first
# quantizing filter of its chain (level key -> bits). That filter checks them, takes them as its own and removes
# the key, so it never leaves the site.
SENDER_ENCODED_META_KEY = "splitunet_sender_encoded"
# Bit depths of affine integer quantization; below 8 bits, 8 // bits codes share one byte.
AFFINE_BITS = (8, 4, 2, 1)

_AFFINE = "affine"
_TOP_K = "top_k"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements (what serialization carries, headers aside)."""
    return tensor.numel() * tensor.element_size()


def entry_bytes(payload: torch.Tensor, encoding: Mapping | None) -> int:
    """Bytes of one level on the wire: the payload plus any tensors of its encoding."""
    extra = sum(tensor_bytes(v) for v in (encoding or {}).values() if isinstance(v, torch.Tensor))
    return tensor_bytes(payload) + extra


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) of the last dimension, 8 // bits per byte."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    return (codes << shifts).sum(dim=-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :length].to(torch.uint8)


def quantize_affine(tensor: torch.Tensor, bits: int) -> tuple[torch.Tensor, dict]:
    """Per-channel affine quantization of a ``(B, C, *spatial)`` tensor to ``bits``-bit codes.

    Each (sample, channel) gets its own minimum and step, ``step = (max - min) / (2**bits - 1)``; a value is
    stored as ``round((x - min) / step)``. Reconstruction error is at most ``step / 2`` per element.

    Returns:
        ``(payload, encoding)``: packed ``uint8`` codes of shape ``(B, C, ceil(N * bits / 8))`` and the
        encoding record that :func:`decode_entry` needs.
    """
    if bits not in AFFINE_BITS:
        raise ValueError(f"bits must be one of {AFFINE_BITS}, got {bits}")
    if tensor.dim() < 3:
        raise ValueError(f"expected a (B, C, *spatial) tensor, got shape {tuple(tensor.shape)}")
    flat = tensor.detach().reshape(tensor.shape[0], tensor.shape[1], -1).float()
    low = flat.amin(dim=-1)
    high = flat.amax(dim=-1)
    levels = (1 << bits) - 1
    # A tensor divisor, not a Python number: CUDA divides by a scalar as a multiplication by its reciprocal, which
    # can differ from the CPU's true division in the last bit.
    step = (high - low) / torch.full_like(high, levels)
    # A constant channel has step 0: any positive step reconstructs it exactly from code 0.
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((flat - low[..., None]) / safe_step[..., None]).clamp_(0, levels).to(torch.uint8)
    encoding = {
        "scheme": _AFFINE,
        "bits": bits,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "low": low,
        "step": step,
    }
    return _pack(codes, bits), encoding


def dequantize_affine(payload: torch.Tensor, encoding: Mapping) -> torch.Tensor:
    """Inverse of :func:`quantize_affine` (up to the quantization error), on the payload's device."""
    shape = [int(s) for s in encoding["shape"]]
    codes = _unpack(payload, int(encoding["bits"]), math.prod(shape[2:])).float()
    values = encoding["low"].float()[..., None] + codes * encoding["step"].float()[..., None]
    return values.reshape(shape).to(getattr(torch, encoding["dtype"]))


def affine_layout(payload: torch.Tensor, encoding: Mapping) -> tuple[tuple[int, ...], str]:
    """Check an affine entry's codes and scales against its description, without decoding.

    The codes must be ``uint8`` of shape ``(B, C, ceil(N * bits / 8))`` (so every code is within ``2**bits``),
    ``low`` and ``step`` floating-point ``(B, C)`` tensors, and no step negative (:func:`quantize_affine` makes none;
    a constant channel has step 0). Non-finite scales are left to :func:`affine_value_check`, which counts the
    values they spoil.

    Returns:
        the described shape and dtype name.

    Raises:
        ValueError: what does not match (or a missing field, by name).
    """
    for name in ("bits", "shape", "dtype", "low", "step"):
        if name not in encoding:
            raise ValueError(f"the encoding lacks {name!r}")
    bits = encoding["bits"]
    if isinstance(bits, bool) or bits not in AFFINE_BITS:
        raise ValueError(f"bits must be one of {AFFINE_BITS}, got {bits!r}")
    try:
        shape = tuple(int(s) for s in encoding["shape"])
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a list of ints, got {encoding['shape']!r}") from None
    if len(shape) < 2 or min(shape) < 0:
        raise ValueError(f"shape must be (B, C, ...) of sizes >= 0, got {list(shape)}")
    dtype = str(encoding["dtype"])
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        found = payload.dtype if isinstance(payload, torch.Tensor) else type(payload).__name__
        raise ValueError(f"codes must be a uint8 tensor, got {found}")
    codes_shape = (*shape[:2], -(-math.prod(shape[2:]) * int(bits) // 8))
    if tuple(payload.shape) != codes_shape:
        raise ValueError(
            f"codes have shape {tuple(payload.shape)}; {bits}-bit codes of {list(shape)} take {codes_shape}"
        )
    for name in ("low", "step"):
        scale = encoding[name]
        if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or tuple(scale.shape) != shape[:2]:
            found = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise ValueError(f"{name} must be a floating-point {shape[:2]} tensor, got {found}")
    if bool((encoding["step"] < 0).any()):
        raise ValueError("a step is negative")
    return shape, dtype


def affine_value_check(payload: torch.Tensor, encoding: Mapping, largest: bool = False) -> tuple[int, float | None]:
    """What :func:`dequantize_affine` would give, in two numbers, from the codes and scales alone.

    Each (sample, channel) decodes to at most ``2**bits`` distinct values, ``low + k * step``: they are computed
    once (exactly as decoding computes them, cast to the described dtype), and the codes only say which occur. So
    the count of non-finite values and the largest magnitude equal those of the decoded tensor, without a float
    tensor of its size. Call :func:`affine_layout` first.

    Args:
        payload: the packed codes.
        encoding: their encoding record.
        largest: also find the largest absolute value (reads every code; otherwise only when some are non-finite).

    Returns:
        ``(non_finite, largest_abs)``: values decoding to NaN or infinity, and the largest absolute value of the
        others' tensor (``None`` unless asked for, or when the tensor is empty or holds non-finite values).
    """
    bits = int(encoding["bits"])
    shape = [int(s) for s in encoding["shape"]]
    dtype = getattr(torch, str(encoding["dtype"]))
    k = torch.arange(1 << bits, dtype=torch.float32, device=payload.device)
    low = encoding["low"].float().to(payload.device)[..., None]
    step = encoding["step"].float().to(payload.device)[..., None]
    table = (low + k * step).to(dtype)  # (B, C, 2**bits): every value a code can decode to
    bad = ~torch.isfinite(table)
    length = math.prod(shape[2:])
    if not length:
        return 0, None
    if bool(bad.any()):
        codes = _unpack(payload, bits, length).long()
        return int(bad.gather(-1, codes).sum()), None
    if not largest:
        return 0, None
    codes = _unpack(payload, bits, length)
    # Decoding is monotone in the code (step >= 0), so the largest magnitude is at the smallest or largest code.
    ends = torch.stack([codes.amin(dim=-1), codes.amax(dim=-1)], dim=-1).long()
    return 0, float(table.gather(-1, ends).abs().max())


@dataclass(frozen=True, eq=False)
class EncodedLevel:
    """One level as it travels: its payload and its encoding record (tensors on one device).

    A sender on a GPU encodes there and copies only these tensors to the host; a receiver copies them to its
    device and calls :meth:`decode` there.
    """

    payload: torch.Tensor
    encoding: Mapping

    @classmethod
    def affine(cls, tensor: torch.Tensor, bits: int) -> EncodedLevel:
        """:func:`quantize_affine` of ``tensor``, on its device."""
        return cls(*quantize_affine(tensor, bits))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that cross: ``"payload"`` and those of the encoding record, by name."""
        extra = {name: value for name, value in self.encoding.items() if isinstance(value, torch.Tensor)}
        return {"payload": self.payload, **extra}

    def replace_tensors(self, tensors: Mapping[str, torch.Tensor]) -> EncodedLevel:
        """The same level with its tensors replaced (e.g. by copies on another device), by :meth:`tensors` name."""
        encoding = dict(self.encoding)
        encoding.update({name: value for name, value in tensors.items() if name != "payload"})
        return EncodedLevel(tensors["payload"], encoding)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> EncodedLevel:
        """The same level with ``fn`` applied to each of its tensors."""
        return self.replace_tensors({name: fn(value) for name, value in self.tensors().items()})

    def decode(self) -> torch.Tensor:
        """The dense tensor, on the payload's device."""
        return decode_entry(self.payload, self.encoding)

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors (what crosses PCIe or the wire, headers aside)."""
        return entry_bytes(self.payload, self.encoding)


def sparsify_top_k(tensor: torch.Tensor, fraction: float) -> tuple[torch.Tensor, dict]:
    """Keep the ``ceil(fraction * N)`` largest-magnitude entries of each sample of a ``(B, ...)`` tensor.

    Returns:
        ``(values, encoding)``: kept values ``(B, k)`` in the input dtype, and the encoding record holding
        their flat indices within each sample (``int32``, or ``int64`` beyond 2**31 elements).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = tensor.detach().reshape(tensor.shape[0], -1)
    k = min(max(1, math.ceil(fraction * flat.shape[1])), flat.shape[1])
    indices = flat.abs().topk(k, dim=1, sorted=False).indices
    values = flat.gather(1, indices)
    index_dtype = torch.int32 if flat.shape[1] < 2**31 else torch.int64
    encoding = {
        "scheme": _TOP_K,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "indices": indices.to(index_dtype),
    }
    return values.contiguous(), encoding


def densify_top_k(values: torch.Tensor, encoding: Mapping) -> torch.Tensor:
    """Inverse of :func:`sparsify_top_k`: zeros everywhere but at the kept indices."""
    shape = [int(s) for s in encoding["shape"]]
    dense = torch.zeros(shape[0], math.prod(shape[1:]), dtype=values.dtype, device=values.device)
    dense.scatter_(1, encoding["indices"].long().to(values.device), values)
    return dense.reshape(shape).to(getattr(torch, encoding["dtype"]))


def decode_entry(payload: torch.Tensor, encoding: Mapping | None) -> torch.Tensor:
    """A level's dense tensor from its payload and encoding record (``None``: not encoded)."""
    if not encoding:
        return payload
    scheme = encoding.get("scheme")
    if scheme == _AFFINE:
        return dequantize_affine(payload, encoding)
    if scheme == _TOP_K:
        return densify_top_k(payload, encoding)
    raise ValueError(f"unknown wire encoding {scheme!r}")
