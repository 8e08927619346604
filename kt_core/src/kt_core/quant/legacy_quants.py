"""Decoders for GGML's original 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each block holds one fp16 scale `d` (and for the `_1` variants an fp16 offset `m`) plus
32 quants. 4-bit quants sit in 16 bytes, element `i` in the low nibble of byte `i` and
element `i + 16` in the high nibble; the 5-bit formats add a 32-bit word whose bit `i`
is the fifth bit of element `i`. Values are `d * (q - bias)` or `d * q + m`, computed in
float32 exactly as gguf-py and ggml do.

The blocks are 18 to 34 bytes, so per-block work must be a few vectorized ops over word
views; see `bit_fields` for why words rather than bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from gguf import GGMLQuantizationType

from kt_core.quant.bit_fields import (
    bits_to_bytes,
    f16_field,
    offset_codes_to_float,
    packed_words,
    unpack_bit_fields,
)
from kt_core.quant.block_decoder import BlockDecoder


def decode_q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q4_0 (18 bytes: fp16 d, 16 bytes of nibbles): value = d * (q - 8)."""
    codes = unpack_bit_fields(blocks.view(torch.int16)[:, 1:9], 4, 8).view(torch.uint8)
    offset_codes_to_float(codes, 8, out)
    out.mul_(f16_field(blocks, 0))


def decode_q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q4_1 (20 bytes: fp16 d, fp16 m, 16 bytes of nibbles): value = d * q + m."""
    codes = unpack_bit_fields(blocks.view(torch.int32)[:, 1:5], 4, 4).view(torch.uint8)
    out.copy_(codes)
    out.mul_(f16_field(blocks, 0))
    out.add_(f16_field(blocks, 2))


def _add_fifth_bits(codes: torch.Tensor, high_bits: torch.Tensor) -> None:
    """OR bit `i` of each block's 32-bit `high_bits` into bit 4 of `codes` byte `i`.

    `codes` holds the 32 nibble codes of each block in element order (any word type);
    `high_bits` is `(n, 1)` int32.
    """
    spread = bits_to_bytes(high_bits)
    spread.bitwise_left_shift_(4)
    codes.view(torch.int32).bitwise_or_(spread)


def decode_q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q5_0 (22 bytes: fp16 d, u32 high bits, 16 bytes of nibbles): value = d * (q - 16).

    The block is only 2-byte aligned, so the 32-bit high-bit word is copied out (as
    two int16s) before it is read as an int32.
    """
    codes = unpack_bit_fields(blocks.view(torch.int16)[:, 3:11], 4, 8)
    _add_fifth_bits(codes, packed_words(blocks, 2, 6, torch.int32))
    offset_codes_to_float(codes.view(torch.uint8), 16, out)
    out.mul_(f16_field(blocks, 0))


def decode_q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q5_1 (24 bytes: fp16 d, fp16 m, u32 high bits, 16 bytes of nibbles): value = d * q + m."""
    words = blocks.view(torch.int32)
    codes = unpack_bit_fields(words[:, 2:6], 4, 4)
    _add_fifth_bits(codes, words[:, 1:2])
    out.copy_(codes.view(torch.uint8))
    out.mul_(f16_field(blocks, 0))
    out.add_(f16_field(blocks, 2))


def decode_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q8_0 (34 bytes: fp16 d, 32 int8 quants): value = d * q.

    The strided int8 quants are widened straight into `out`, then scaled in place by a
    broadcast (n, 1) scale: two passes over `out`. (Widening the whole chunk, scale bytes
    included, to a float scratch first and multiplying a strided view of it was 2.6x
    slower with torch 2.13 on a 2-core EPYC: an extra 4.25 bytes written per value.)
    """
    out.copy_(blocks[:, 2:].view(torch.int8))
    out.mul_(f16_field(blocks, 0))


DECODERS: Mapping[GGMLQuantizationType, BlockDecoder] = {
    GGMLQuantizationType.Q4_0: decode_q4_0,
    GGMLQuantizationType.Q4_1: decode_q4_1,
    GGMLQuantizationType.Q5_0: decode_q5_0,
    GGMLQuantizationType.Q5_1: decode_q5_1,
    GGMLQuantizationType.Q8_0: decode_q8_0,
}
