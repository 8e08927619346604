"""The 32-element "legacy" ggml block formats Q8_0 and Q4_0.

Both store one fp16 scale ``d`` per 32 values and no offset, so a value is ``d * q``.
Their reference quantizers are a single closed-form step (no search), and gguf-py
implements them too; we reproduce the reference arithmetic exactly, in float32 and in
the same order, so that our bytes are identical to gguf-py's and llama.cpp's. That makes
files converted by kt indistinguishable from files converted by the usual tools.

Layouts (little endian):

- Q8_0, 34 bytes: ``d: f16``, ``qs: int8[32]``; value ``i`` is ``d * qs[i]``.
- Q4_0, 18 bytes: ``d: f16``, ``qs: u8[16]``; byte ``j`` holds value ``j`` in its low
  nibble and value ``j + 16`` in its high nibble, each biased by 8.
"""

from __future__ import annotations

import torch


def round_half_away_from_zero(v: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: ties go away from zero (torch.round sends them to even).

    Computed as ``floor(|v|)`` plus one when the fractional part is at least one half;
    the fractional part ``|v| - floor(|v|)`` is exact in binary floating point, unlike
    ``floor(|v| + 0.5)``, which rounds 0.49999997 up.
    """
    a = v.abs()
    whole = a.floor()
    whole += (a - whole) >= 0.5
    return whole.copysign_(v)


def _safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """``1 / d``, or 0 where ``d`` is 0, so all-zero blocks quantize to zeros, not NaNs."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def encode_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0: ``d = max|x| / 127``, ``q = roundf(x / d)`` (via the float32 reciprocal, as ggml)."""
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = round_half_away_from_zero(blocks * _safe_reciprocal(d)).to(torch.int8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)


def encode_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0: the value of largest magnitude, with its sign, maps to -8 and sets ``d``.

    Using the signed extreme (``d = max / -8``) spends the asymmetric code range [-8, 7]
    on whichever side holds the extreme, so the extreme itself is represented exactly.
    Codes are ``trunc(x / d + 8.5)`` clipped to 15, as in the reference.
    """
    index = blocks.abs().argmax(dim=-1, keepdim=True)
    extreme = torch.gather(blocks, -1, index)
    d = extreme / -8
    q = torch.trunc(blocks * _safe_reciprocal(d) + 8.5).clamp_(0, 15).to(torch.uint8)
    half = blocks.shape[-1] // 2
    packed = q[:, :half] | (q[:, half:] << 4)
    return torch.cat([d.to(torch.float16).view(torch.uint8), packed], dim=-1)
