"""Q4_K and Q5_K: 256-value super-blocks of eight 32-value sub-blocks with scale and min.

A value is ``d * sc[j] * q - dmin * m[j]`` for sub-block ``j``, where ``d`` and ``dmin``
are fp16 per super-block and ``sc[j]``, ``m[j]`` are 6-bit integers. Quantizing is two
levels deep, as in ggml's reference: first find the best float scale and min of every
sub-block (`search_scale_and_offset`, weighted towards large values), then express those
as 6-bit multiples of the super-block's ``d = max(scale) / 63`` and
``dmin = max(min) / 63``, and finally round every value against the scale and min it
will actually be decoded with.

Layouts (little endian), byte offsets within one block:

- Q4_K, 144 bytes: ``d: f16`` @0, ``dmin: f16`` @2, ``scales: u8[12]`` @4,
  ``qs: u8[128]`` @16.
- Q5_K, 176 bytes: as Q4_K, then ``qh: u8[32]`` @16 and ``qs: u8[128]`` @48.

``qs`` holds the low 4 bits: 32-byte group ``g`` holds sub-block ``2g`` in the low
nibbles and sub-block ``2g + 1`` in the high nibbles, value ``i`` of the sub-block in
byte ``i``. ``qh`` (Q5_K) holds the fifth bit: bit ``j`` of byte ``i`` is the high bit of
value ``i`` of sub-block ``j``. The twelve ``scales`` bytes pack the sixteen 6-bit numbers:
bytes 0-3 are ``sc[0..3]`` with the top two bits of ``sc[4..7]`` in bits 6-7, bytes 4-7
are ``m[0..3]`` with the top two bits of ``m[4..7]``, and bytes 8-11 hold the low four
bits of ``sc[4..7]`` (low nibble) and ``m[4..7]`` (high nibble).
"""

from __future__ import annotations

import torch

from .quantize_search import search_scale_and_offset

SUPER_BLOCK = 256
SUB_BLOCK = 32
N_SUB = SUPER_BLOCK // SUB_BLOCK


def _sub_block_weights(sub: torch.Tensor) -> torch.Tensor:
    """ggml's importance weights: ``rms(sub-block) + |x|``.

    Large values matter more to a matmul than small ones, but a pure ``|x|`` weight would
    let small values drift arbitrarily; the rms floor keeps every value in the fit.
    """
    rms = sub.square().mean(-1, keepdim=True).sqrt_()
    return sub.abs().add_(rms)


def _to_six_bits(values: torch.Tensor, top_code: int = 63) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) non-negative floats → (fp16 super-scale (B, 1), multiples (B, S) in [0, top_code] as uint8).

    The largest value maps to `top_code` (63 for the 6-bit fields of Q4_K/Q5_K, 15 for
    the 4-bit ones of Q2_K).
    """
    top = values.amax(dim=-1, keepdim=True)
    inv = torch.where(top > 0, top_code / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
    codes = (values * inv).round_().clamp_(0, top_code).to(torch.uint8)
    return (top / top_code).to(torch.float16), codes


def _pack_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Pack eight 6-bit scales and eight 6-bit mins (uint8, (B, 8) each) into (B, 12) bytes."""
    lo_sc, hi_sc = sc[:, :4], sc[:, 4:]
    lo_m, hi_m = m[:, :4], m[:, 4:]
    return torch.cat(
        [
            lo_sc | ((hi_sc >> 4) << 6),
            lo_m | ((hi_m >> 4) << 6),
            (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4),
        ],
        dim=1,
    )


def _quantize_super_blocks(
    blocks: torch.Tensor, levels: int, first_step: float, n_steps: int
) -> tuple[torch.Tensor, ...]:
    """Shared two-level quantization; returns (d, dmin, packed scales, codes (B, 8, 32) uint8)."""
    n_blocks = blocks.shape[0]
    sub = blocks.view(n_blocks * N_SUB, SUB_BLOCK)
    scale, offset = search_scale_and_offset(sub, _sub_block_weights(sub), levels, first_step, 0.1, n_steps)

    d, sc = _to_six_bits(scale.view(n_blocks, N_SUB))
    dmin, m = _to_six_bits(offset.view(n_blocks, N_SUB))

    # Round against the decoded (fp16 × 6-bit) scale and min, not the searched floats.
    step = (d.float() * sc.float()).unsqueeze(-1)
    floor = (dmin.float() * m.float()).unsqueeze(-1)
    usable = step > 0
    values = blocks.view(n_blocks, N_SUB, SUB_BLOCK)
    codes = ((values + floor) / torch.where(usable, step, torch.ones_like(step))).round_().clamp_(0, levels)
    codes = torch.where(usable, codes, torch.zeros_like(codes)).to(torch.uint8)
    return d, dmin, _pack_scales(sc, m), codes


def _pack_low_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(B, 8, 32) codes → (B, 128): sub-blocks 2g and 2g+1 share bytes as low/high nibbles."""
    pairs = (codes & 0x0F).view(codes.shape[0], N_SUB // 2, 2, SUB_BLOCK)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def encode_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K: (B, 256) float32 → (B, 144) bytes.

    4-bit codes; the search maps each sub-block's range onto 14.0, 14.1, … 16.0 steps
    (ggml's ladder for Q4_K).
    """
    d, dmin, scales, codes = _quantize_super_blocks(blocks, levels=15, first_step=-1.0, n_steps=20)
    return torch.cat(
        [d.view(torch.uint8), dmin.view(torch.uint8), scales, _pack_low_nibbles(codes)],
        dim=1,
    )


def encode_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K: (B, 256) float32 → (B, 176) bytes.

    5-bit codes; the search maps each sub-block's range onto 30.5, 30.6, … 32.0 steps
    (ggml's ladder for Q5_K).
    """
    d, dmin, scales, codes = _quantize_super_blocks(blocks, levels=31, first_step=-0.5, n_steps=15)
    shifts = torch.arange(N_SUB, dtype=torch.uint8).view(1, N_SUB, 1)
    high = ((codes >> 4) << shifts).sum(dim=1, dtype=torch.uint8)
    return torch.cat(
        [d.view(torch.uint8), dmin.view(torch.uint8), scales, high, _pack_low_nibbles(codes)],
        dim=1,
    )
