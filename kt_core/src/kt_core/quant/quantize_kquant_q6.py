"""Q6_K: 256-value super-blocks of sixteen 16-value sub-blocks, symmetric, 8-bit scales.

A value is ``d * sc[j] * (q - 32)`` for sub-block ``j``, with ``d`` fp16 per super-block,
``sc[j]`` a signed 8-bit integer and ``q`` a 6-bit code. As in ggml's reference, each
sub-block first gets its best float scale (`search_symmetric_scale`); the sub-block scale
of largest magnitude is then mapped to -128 (``d = -max / 128``, so the sign of ``d``
follows it and the extra negative code is used) and every value is rounded against the
decoded ``d * sc[j]``.

Layout (little endian), 210 bytes: ``ql: u8[128]`` @0, ``qh: u8[64]`` @128,
``scales: i8[16]`` @192, ``d: f16`` @208. Each 128-value half ``h`` owns ``ql`` bytes
``64h…64h+63`` and ``qh`` bytes ``32h…32h+31``. Value ``r`` of half ``h`` keeps its low
four bits in ``ql[64h + r % 64]`` (low nibble if ``r < 64``, else high nibble) and its top
two bits in ``qh[32h + r % 32]`` at bit ``2 * (r // 32)``.
"""

from __future__ import annotations

import torch

from .quantize_search import GROUP_MAX_EPS, search_symmetric_scale

SUPER_BLOCK = 256
SUB_BLOCK = 16
N_SUB = SUPER_BLOCK // SUB_BLOCK
LEVELS = 32


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """(B, 256) codes in [0, 63] → (B, 192) bytes: ``ql`` then ``qh``."""
    n_blocks = codes.shape[0]
    halves = codes.view(n_blocks, 2, 2, 64)
    ql = (halves[:, :, 0] & 0x0F) | ((halves[:, :, 1] & 0x0F) << 4)
    top = (codes >> 4).view(n_blocks, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    qh = (top << shifts).sum(dim=2, dtype=torch.uint8)
    return torch.cat([ql.reshape(n_blocks, 128), qh.reshape(n_blocks, 64)], dim=1)


def encode_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K: (B, 256) float32 → (B, 210) bytes."""
    n_blocks = blocks.shape[0]
    scale = search_symmetric_scale(blocks.view(n_blocks * N_SUB, SUB_BLOCK), LEVELS).view(n_blocks, N_SUB)

    index = scale.abs().argmax(dim=1, keepdim=True)
    extreme = torch.gather(scale, 1, index)
    empty = extreme.abs() < GROUP_MAX_EPS
    inv = torch.where(empty, torch.zeros_like(extreme), -128.0 / torch.where(empty, torch.ones_like(extreme), extreme))
    sc = (scale * inv).round_().clamp_(-128, 127)
    d = torch.where(empty, torch.zeros_like(extreme), -extreme / 128).to(torch.float16)

    step = (d.float() * sc).unsqueeze(-1)
    usable = step != 0
    values = blocks.view(n_blocks, N_SUB, SUB_BLOCK)
    codes = (values / torch.where(usable, step, torch.ones_like(step))).round_().clamp_(-LEVELS, LEVELS - 1)
    codes = torch.where(usable, codes, torch.zeros_like(codes)).add_(LEVELS).to(torch.uint8)

    return torch.cat(
        [_pack(codes.view(n_blocks, SUPER_BLOCK)), sc.to(torch.int8).view(torch.uint8), d.view(torch.uint8)],
        dim=1,
    )
