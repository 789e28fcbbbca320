"""Compact encodings of feature tensors on the wire, self-described in the DXO so any receiver can decode them.

A filter that encodes a level (quantization to a few bits, top-k sparsification) replaces the level's tensor in
the DXO data by its payload and records how to decode it under ``meta[ENCODING_META_KEY][level_key]``.
:func:`splitunet.wire.transport.dxo_to_features` decodes every such entry, so the decoder (and the sites' encoders
receiving gradients) always see dense float tensors, and a receiver needs no filter paired with the sender's:
a site's privacy policy may quantize without the job knowing.

Plain torch, no FLARE: the same functions are tested and benchmarked in one process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = [
    "ENCODING_META_KEY",
    "AFFINE_BITS",
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
    step = (high - low) / levels
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
    """Inverse of :func:`quantize_affine` (up to the quantization error)."""
    shape = [int(s) for s in encoding["shape"]]
    codes = _unpack(payload, int(encoding["bits"]), math.prod(shape[2:])).float()
    values = encoding["low"].float()[..., None] + codes * encoding["step"].float()[..., None]
    return values.reshape(shape).to(getattr(torch, encoding["dtype"]))


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
