"""Q2_K and Q3_K: 256-value super-blocks of sixteen 16-value sub-blocks, 2 and 3 bits a value.

- Q2_K: a value is ``d * sc[j] * q - dmin * m[j]`` with ``q ∈ [0, 3]`` and 4-bit ``sc[j]``,
  ``m[j]`` per sub-block ``j`` under fp16 ``d``, ``dmin``: Q4_K's scale-and-min scheme
  with four levels. Each sub-block's float scale and min come from
  `search_scale_and_offset` (importance weights ``rms + |x|`` as for Q4_K), and are then
  expressed as 4-bit multiples of ``d = max(scale) / 15`` and ``dmin = max(min) / 15``.
- Q3_K: a value is ``d * sc[j] * q`` with ``q ∈ [-4, 3]`` and a signed 6-bit
  ``sc[j] ∈ [-32, 31]`` under fp16 ``d``: Q6_K's symmetric scheme with eight levels. Each
  sub-block's float scale comes from `search_symmetric_scale`; the one of largest
  magnitude maps to -32 (``d = -max / 32``, so the extra negative code is used).

In both, every value is finally rounded against the scale (and min) it will actually be
decoded with, not the searched floats.

Layouts (little endian), byte offsets within one block:

- Q2_K, 84 bytes: ``scales: u8[16]`` @0 (``sc[j]`` low nibble, ``m[j]`` high nibble),
  ``qs: u8[64]`` @16, ``d: f16`` @80, ``dmin: f16`` @82.
- Q3_K, 110 bytes: ``hmask: u8[32]`` @0, ``qs: u8[64]`` @32, ``scales: u8[12]`` @96,
  ``d: f16`` @108.

``qs`` (both) holds two bits per value: value ``r`` of the super-block, written
``r = 128h + 32s + p``, sits in byte ``32h + p`` at bits ``2s``. In Q3_K those are the
low two bits of the code ``q + 4 ∈ [0, 7]``; its third bit is bit ``r // 32`` of
``hmask[r % 32]``. Q3_K's twelve ``scales`` bytes hold ``sc[j] + 32`` (6 bits): the low
four bits of ``j`` in byte ``j % 8`` (low nibble for ``j < 8``, else high nibble), the
top two in byte ``8 + j % 4`` at bits ``2 * (j // 4)``.
"""

from __future__ import annotations

import torch

from .quantize_kquant_minmax import _sub_block_weights, _to_six_bits
from .quantize_search import (
    GROUP_MAX_EPS,
    refine_sub_block_scales,
    search_scale_and_offset,
    search_symmetric_scale,
)

SUPER_BLOCK = 256
SUB_BLOCK = 16
N_SUB = SUPER_BLOCK // SUB_BLOCK

_TWO_BIT_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)


def _pack_two_bits(codes: torch.Tensor) -> torch.Tensor:
    """(B, 256) codes in [0, 3] → (B, 64) bytes, four values a byte as Q2_K/Q3_K's ``qs``."""
    n_blocks = codes.shape[0]
    return (codes.view(n_blocks, 2, 4, 32) << _TWO_BIT_SHIFTS).sum(dim=2, dtype=torch.uint8).view(n_blocks, 64)


def _round_against(values: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``round(values / step)`` clipped to [lo, hi], and 0 where the step is 0 (float32)."""
    usable = step != 0
    codes = (values / torch.where(usable, step, torch.ones_like(step))).round_().clamp_(lo, hi)
    return torch.where(usable, codes, torch.zeros_like(codes))


def encode_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q2_K: (B, 256) float32 → (B, 84) bytes.

    The search maps each sub-block's range onto 2.5, 2.6, … 4.0 steps (ggml's ladder for
    Q2_K, refined from the best offset so far).
    """
    n_blocks = blocks.shape[0]
    sub = blocks.view(n_blocks * N_SUB, SUB_BLOCK)
    scale, offset = search_scale_and_offset(sub, _sub_block_weights(sub), 3, -0.5, 0.1, 15)
    d, sc = _to_six_bits(scale.view(n_blocks, N_SUB), top_code=15)
    dmin, m = _to_six_bits(offset.view(n_blocks, N_SUB), top_code=15)

    step = (d.float() * sc.float()).unsqueeze(-1)
    floor = (dmin.float() * m.float()).unsqueeze(-1)
    codes = _round_against(blocks.view(n_blocks, N_SUB, SUB_BLOCK) + floor, step, 0, 3).to(torch.uint8)
    return torch.cat(
        [sc | (m << 4), _pack_two_bits(codes.view(n_blocks, SUPER_BLOCK)), d.view(torch.uint8), dmin.view(torch.uint8)],
        dim=1,
    )


def _pack_q3_scales(u: torch.Tensor) -> torch.Tensor:
    """(B, 16) 6-bit scale codes ``sc + 32`` (uint8) → Q3_K's (B, 12) ``scales`` bytes."""
    n_blocks = u.shape[0]
    low = u & 0x0F
    top = (u >> 4).view(n_blocks, 4, 4)  # [j // 4, j % 4]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)
    return torch.cat([low[:, :8] | (low[:, 8:] << 4), (top << shifts).sum(dim=1, dtype=torch.uint8)], dim=1)


def encode_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K: (B, 256) float32 → (B, 110) bytes.

    The sub-block search maps the value of largest magnitude onto -3.1, -3.2, … -4.9
    steps and minimizes the plain squared error (uniform weights: with eight codes, ggml's
    ``x²`` weighting buys the large values' accuracy with 6% more rms error overall). Once
    ``d`` is fixed, each sub-block's 6-bit scale is re-picked among its nearest integers
    by the error it actually gives (`refine_sub_block_scales`).
    """
    n_blocks = blocks.shape[0]
    scale = search_symmetric_scale(blocks.view(n_blocks * N_SUB, SUB_BLOCK), 4, uniform_weights=True)
    scale = scale.view(n_blocks, N_SUB)

    index = scale.abs().argmax(dim=1, keepdim=True)
    extreme = torch.gather(scale, 1, index)
    empty = extreme.abs() < GROUP_MAX_EPS
    safe = torch.where(empty, torch.ones_like(extreme), extreme)
    sc = torch.where(empty, torch.zeros_like(scale), scale * (-32.0 / safe)).round_().clamp_(-32, 31)
    d = torch.where(empty, torch.zeros_like(extreme), -extreme / 32).to(torch.float16)

    values = blocks.view(n_blocks, N_SUB, SUB_BLOCK)
    sc = refine_sub_block_scales(values, d.float(), sc, (-32, 31), lambda v, s: _round_against(v, s, -4, 3).mul_(s))
    step = (d.float() * sc).unsqueeze(-1)
    codes = _round_against(values, step, -4, 3).add_(4).to(torch.uint8)
    codes = codes.view(n_blocks, SUPER_BLOCK)
    high = (codes >> 2).view(n_blocks, 8, 32) << torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    return torch.cat(
        [
            high.sum(dim=1, dtype=torch.uint8),
            _pack_two_bits(codes & 0x03),
            _pack_q3_scales(sc.add_(32).to(torch.uint8)),
            d.view(torch.uint8),
        ],
        dim=1,
    )
