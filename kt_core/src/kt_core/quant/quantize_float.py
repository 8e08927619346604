"""Float storage types (F32, F16, BF16) as GGUF bytes.

These are casts, not quantizers, but `kt convert` writes them through the same
block-encoder interface so that one driver handles chunking and output layout for every
type. Each encoder takes float32 "blocks" of one element, shape ``(n, 1)``, and returns
the little-endian bytes, shape ``(n, bytes_per_element)``.

BF16 follows ggml's rounding exactly (round to nearest even; NaN kept as a quiet NaN with
its sign and upper payload bits) so that our files are byte-identical to what gguf-py and
llama.cpp write for the same input.
"""

from __future__ import annotations

import torch


def encode_f32(blocks: torch.Tensor) -> torch.Tensor:
    """Float32 values as their 4 little-endian bytes each."""
    return blocks.contiguous().view(torch.uint8)


def encode_f16(blocks: torch.Tensor) -> torch.Tensor:
    """IEEE half precision, round to nearest even (values beyond ±65504 become ±inf, as in ggml)."""
    return blocks.to(torch.float16).view(torch.uint8)


def encode_bf16(blocks: torch.Tensor) -> torch.Tensor:
    """bfloat16 with ggml's rounding: nearest even, NaNs made quiet but otherwise kept.

    torch's own conversion rounds identically for every non-NaN value but replaces every
    NaN by the canonical 0x7FC0; ggml keeps the sign and the top payload bits. NaNs do not
    belong in model weights, but a converter must not change them silently either, so
    they get ggml's treatment.
    """
    out = blocks.to(torch.bfloat16)
    nan = torch.isnan(blocks)
    if bool(nan.any()):
        bits = blocks[nan].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        quiet = ((bits >> 16) | 0x40) & 0xFFFF
        signed16 = torch.where(quiet >= 0x8000, quiet - 0x10000, quiet).to(torch.int16)
        out.view(torch.int16)[nan] = signed16
    return out.view(torch.uint8)
