"""The packed int4 layout the Triton kernel reads: 8 values per int32, along K.

For int4 values ``q [..., N, K]`` (``-8 … 7``) the packed tensor is int32
``[..., K // 8, N]``:

* word ``(i, n)`` holds the eight values ``q[n, 8i] … q[n, 8i + 7]``;
* value ``q[n, 8i + j]`` sits in bits ``4j … 4j + 3`` (j = 0 in the lowest nibble), stored
  offset-binary as ``q + 8`` (``0 … 15``), so unpacking is ``((word >> 4j) & 0xF) - 8``.

Why this order: a tile of the kernel covers ``BLOCK_K`` rows of K by ``BLOCK_N`` output
columns; with N the contiguous dimension, neighbouring threads load neighbouring words
(coalesced), and one word feeds eight consecutive K rows of the same column. Scales are
stored the same way round, ``[..., K // group_size, N]``.
"""

from __future__ import annotations

import torch

from kt_ops_marlin.group_size import PACK_MULTIPLE
from kt_ops_marlin.int4 import INT4_MAX, INT4_MIN

_OFFSET = 8
_NIBBLE = 4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values ``[..., N, K]`` (int8, ``-8 … 7``) into int32 ``[..., K // 8, N]``.

    Raises ``ValueError`` if K is not a multiple of 8 or a value is out of range: a
    silently wrapped nibble would be a wrong weight.
    """
    if q.dim() < 2:
        raise ValueError(f"pack_int4 needs [..., N, K] values, got shape {tuple(q.shape)}")
    n, k = q.shape[-2:]
    if k % PACK_MULTIPLE:
        raise ValueError(f"pack_int4: K={k} is not a multiple of {PACK_MULTIPLE}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(f"pack_int4: values must lie in [{INT4_MIN}, {INT4_MAX}], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int64) + _OFFSET).transpose(-1, -2)  # [..., K, N]
    u = u.reshape(*q.shape[:-2], k // PACK_MULTIPLE, PACK_MULTIPLE, n)
    shifts = (torch.arange(PACK_MULTIPLE, device=q.device, dtype=torch.int64) * _NIBBLE).view(PACK_MULTIPLE, 1)
    words = (u << shifts).sum(dim=-2)  # disjoint bit fields: the sum is the bitwise or, in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's-complement int32
    return words.to(torch.int32).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: int32 ``[..., K // 8, N]`` → int8 values ``[..., N, K]``."""
    if packed.dtype != torch.int32 or packed.dim() < 2:
        raise ValueError(f"unpack_int4 needs int32 [..., K // 8, N], got {packed.dtype} {tuple(packed.shape)}")
    kw, n = packed.shape[-2:]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(PACK_MULTIPLE, device=packed.device, dtype=torch.int64) * _NIBBLE).view(PACK_MULTIPLE, 1)
    u = (words.unsqueeze(-2) >> shifts) & 0xF  # [..., K // 8, 8, N]
    q = (u - _OFFSET).reshape(*packed.shape[:-2], kw * PACK_MULTIPLE, n)
    return q.transpose(-1, -2).to(torch.int8).contiguous()
