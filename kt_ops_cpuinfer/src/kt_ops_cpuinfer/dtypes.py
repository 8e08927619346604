"""The tensor dtypes the engine reads and writes activations in, and rows ready for it.

The engine computes in float32, but its ops read float16/bfloat16 inputs and write 16-bit
outputs themselves (widening exactly, rounding to nearest even as torch's casts do), so
a call on the model's bfloat16 activations needs no ``.to(float32)`` before it and no
``.to(bfloat16)`` after: two torch ops per call that cost more than a small projection's
arithmetic in decode.
"""

from __future__ import annotations

import torch

ENGINE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
"""Tensor dtypes the engine reads and writes activations in, by its names for them."""


def engine_rows(x: torch.Tensor, features: int) -> torch.Tensor:
    """`x` [..., features] as contiguous CPU rows [N, features] in a dtype the engine reads
    (its own when it is one of `ENGINE_DTYPES`, else float32)."""
    rows = x.detach().reshape(-1, features)
    if rows.device.type != "cpu" or rows.dtype not in ENGINE_DTYPES:
        rows = rows.to(device="cpu", dtype=torch.float32)
    return rows.contiguous()
