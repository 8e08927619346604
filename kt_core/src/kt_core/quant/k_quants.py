"""Decoders for GGML's 256-element "k-quant" super-block formats: Q2_K to Q6_K and Q8_K.

A super-block splits its 256 elements into sub-blocks of 16 or 32 that each carry a
small integer scale (and for Q2_K/Q4_K/Q5_K a min), which are in turn multiplied by one
or two fp16 super-scales. Quants are spread over several bit planes (low nibbles, 2-bit
fields, separate high-bit arrays), so each decoder reassembles the code of every element
with word-level ops (see `bit_fields`), converts codes to float once, and applies the
per-sub-block scale with a broadcast multiply, in the same float32 order as gguf-py.

GGML's bit planes are laid out group by group (e.g. low nibbles of a 32-byte group,
then its high nibbles), which `unpack_bit_fields` reproduces directly, so every code
tensor is already in element order: the float passes then run over contiguous memory,
the only layout torch processes at full speed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from gguf import GGMLQuantizationType

from kt_core.quant.bit_fields import f16_field, masked, offset_codes_to_float, packed_words, unpack_bit_fields
from kt_core.quant.block_decoder import BlockDecoder


def _bytes_as_float(words: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous `(n, k)` word tensor as `(n, k * itemsize)` float32."""
    return words.view(torch.uint8).to(torch.float32)


def decode_q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q2_K (84 bytes): 16 scale/min nibble pairs, 64 bytes of 2-bit quants, fp16 d, dmin.

    Element `128h + 32k + l` is bits `2k..2k+1` of quant byte `32h + l`; group `g` of 16
    elements has value `d * (scale_g & 15) * q - dmin * (scale_g >> 4)`.
    """
    n = blocks.shape[0]
    codes = unpack_bit_fields(packed_words(blocks, 16, 80), 2, 4)
    out.copy_(codes.view(torch.uint8))
    scales = packed_words(blocks, 0, 16, torch.int32)
    scale = f16_field(blocks, 80) * _bytes_as_float(masked(scales, 0x0F))
    minimum = f16_field(blocks, 82) * _bytes_as_float(masked(torch.bitwise_right_shift(scales, 4), 0x0F))
    groups = out.view(n, 16, 16)
    groups.mul_(scale.unsqueeze(-1))
    groups.sub_(minimum.unsqueeze(-1))


def _q3_k_scales(words: torch.Tensor) -> torch.Tensor:
    """The 16 signed 6-bit Q3_K scales of each block as `(n, 16)` float32.

    `words` are the 12 scale bytes as a contiguous `(n, 3)` int32. Scale `i` takes its
    low 4 bits from byte `i` (low nibble, i < 8) or byte `i - 8` (high nibble), and its
    top 2 bits from bits `2*(i // 4)` of byte `8 + i % 4`; the stored value is biased
    by 32.
    """
    low = unpack_bit_fields(words[:, 0:2], 4, 2)
    low.bitwise_or_(unpack_bit_fields(words[:, 2:3], 2, 1, shift_to=4))
    codes = low.view(torch.uint8)
    codes.sub_(32)
    return codes.view(torch.int8).to(torch.float32)


def decode_q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q3_K (110 bytes): 32 bytes of high bits, 64 bytes of 2-bit quants, 12 bytes of scales, fp16 d.

    Element `128h + 32k + l` has low bits `2k..2k+1` of quant byte `32h + l` and high
    bit `4h + k` of mask byte `l`; its value is `d * (scale - 32) * (code - 4)` with
    `code = low | high << 2` (a set high bit cancels the -4).
    """
    n = blocks.shape[0]
    codes = unpack_bit_fields(packed_words(blocks, 32, 96), 2, 4)
    codes.bitwise_or_(unpack_bit_fields(packed_words(blocks, 0, 32), 1, 4, shift_to=2))
    offset_codes_to_float(codes.view(torch.uint8), 4, out)
    scale = f16_field(blocks, 108) * _q3_k_scales(packed_words(blocks, 96, 108, torch.int32))
    out.view(n, 16, 16).mul_(scale.unsqueeze(-1))


def _k_scales_and_mins(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K sub-block factors as `(n, 2, 8)` float32: `d * scale_s` and `dmin * min_s`.

    The 12 bytes at offset 4 hold eight 6-bit scales and eight 6-bit mins, read here as
    three int32 words A, B, C. Sub-blocks 0-3 take their scale/min from the low 6 bits
    of the bytes of A/B; sub-blocks 4-7 take their low 4 bits from the nibbles of C and
    their top 2 bits from the top bits of A/B.
    """
    n = blocks.shape[0]
    words = packed_words(blocks, 4, 16, torch.int32)
    scale_min_words = words[:, 0:2]
    last = words[:, 2:3]
    high = masked(torch.bitwise_right_shift(scale_min_words, 2), 0x30)
    high.bitwise_or_(torch.cat([masked(last, 0x0F), masked(torch.bitwise_right_shift(last, 4), 0x0F)], dim=1))
    # Per block: [scales 0-3, mins 0-3] then [scales 4-7, mins 4-7]; regroup as scales, mins.
    factors = torch.stack([masked(scale_min_words, 0x3F), high], dim=2)
    values = factors.view(torch.uint8).view(n, 2, 8).to(torch.float32)
    # d and dmin: widening a contiguous copy is ~8x faster than widening the strided pair.
    super_scales = packed_words(blocks, 0, 4, torch.int32).view(torch.float16).to(torch.float32)
    values.mul_(super_scales.unsqueeze(-1))
    return values


def _apply_k_scales(blocks: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> None:
    """Finish Q4_K/Q5_K: `out = d * scale_s * code - dmin * min_s` per 32-element sub-block.

    `codes` holds the 256 unsigned codes of each block in element order.
    """
    n = blocks.shape[0]
    out.copy_(codes.view(torch.uint8).view(n, 256))
    factors = _k_scales_and_mins(blocks)
    sub_blocks = out.view(n, 8, 32)
    sub_blocks.mul_(factors[:, 0].contiguous().unsqueeze(-1))
    sub_blocks.sub_(factors[:, 1].contiguous().unsqueeze(-1))


def decode_q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q4_K (144 bytes): fp16 d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.

    Sub-block `2j` is the low nibbles of bytes `32j..32j+31`, sub-block `2j + 1` their
    high nibbles.
    """
    codes = unpack_bit_fields(packed_words(blocks, 16, 144), 4, 4)
    _apply_k_scales(blocks, codes, out)


def decode_q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q5_K (176 bytes): as Q4_K plus 32 bytes of fifth bits before the nibbles.

    Bit `s` of high-bit byte `l` is the fifth bit of element `l` of sub-block `s`.
    """
    codes = unpack_bit_fields(packed_words(blocks, 48, 176), 4, 4)
    codes.bitwise_or_(unpack_bit_fields(packed_words(blocks, 16, 48), 1, 4, shift_to=4))
    _apply_k_scales(blocks, codes, out)


def decode_q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d.

    In each 128-element half `h`, element `32k + l` takes the low (k < 2) or high
    (k >= 2) nibble of byte `64h + 32(k % 2) + l` and bits `2k..2k+1` of high byte
    `32h + l`; value = `d * scale_g * (code - 32)` per group `g` of 16.
    """
    n = blocks.shape[0]
    codes = unpack_bit_fields(packed_words(blocks, 0, 128), 4, 8)
    codes.bitwise_or_(unpack_bit_fields(packed_words(blocks, 128, 192), 2, 4, shift_to=4))
    offset_codes_to_float(codes.view(torch.uint8), 32, out)
    scale = f16_field(blocks, 208) * blocks[:, 192:208].view(torch.int8).to(torch.float32)
    out.view(n, 16, 16).mul_(scale.unsqueeze(-1))


def decode_q8_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q8_K (292 bytes): float32 d, 256 int8 quants, 16 int16 group sums (unused here).

    Value = d * q. Q8_K is llama.cpp's activation format for k-quant dot products and is
    rarely stored in files, but decoding it is cheap and keeps the type set complete.
    """
    out.copy_(blocks[:, 4:260].view(torch.int8))
    out.mul_(blocks[:, 0:4].view(torch.float32))


DECODERS: Mapping[GGMLQuantizationType, BlockDecoder] = {
    GGMLQuantizationType.Q2_K: decode_q2_k,
    GGMLQuantizationType.Q3_K: decode_q3_k,
    GGMLQuantizationType.Q4_K: decode_q4_k,
    GGMLQuantizationType.Q5_K: decode_q5_k,
    GGMLQuantizationType.Q6_K: decode_q6_k,
    GGMLQuantizationType.Q8_K: decode_q8_k,
}
