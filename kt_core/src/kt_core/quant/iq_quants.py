"""Decoders for the non-linear 4-bit "i-quant" formats IQ4_NL and IQ4_XS.

Both store 4-bit indices into a fixed 16-entry codebook of int8 values (denser near zero,
matching the bell-shaped distribution of weights) scaled by an fp16 `d`; IQ4_XS adds a
signed 6-bit scale per 32-element sub-block on top of a 256-element super-block.

A gather of one codebook entry per element is the expensive part in torch, so lookups
go two codes at a time: two adjacent index bytes read as one little-endian int16 key
select an int16 holding both int8 values, in order. That halves the number of gathers
and needs no index widening beyond int16 to int32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from gguf import GGMLQuantizationType

from kt_core.quant.bit_fields import f16_field, packed_words, unpack_bit_fields
from kt_core.quant.block_decoder import BlockDecoder

CODEBOOK: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""The IQ4_NL/IQ4_XS codebook (`kvalues_iq4nl` in ggml): index 0..15 to int8 value."""

_pair_tables: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """int16 table: entry `a | b << 8` (a, b in 0..15) holds `CODEBOOK[a] | CODEBOOK[b] << 8`.

    Built once per device; 0x0F0F + 1 entries, since keys are two nibble bytes.
    """
    table = _pair_tables.get(device)
    if table is None:
        keys = torch.arange(0x0F0F + 1, dtype=torch.int32)
        codebook = torch.tensor(CODEBOOK, dtype=torch.int32)
        first = codebook[keys & 0xF] & 0xFF
        second = codebook[(keys >> 8) & 0xF] << 8
        table = (first | second).to(torch.int16).to(device)
        _pair_tables[device] = table
    return table


def _look_up(codes: torch.Tensor) -> torch.Tensor:
    """Map a contiguous tensor of 4-bit codes (one per byte lane) to codebook int8 values.

    Returns a flat int8 tensor with one value per code byte, in the same order.
    """
    keys = codes.view(torch.int16).reshape(-1).to(torch.int32)
    return torch.index_select(_pair_table(codes.device), 0, keys).view(torch.int8)


def decode_iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """IQ4_NL (18 bytes: fp16 d, 16 bytes of index nibbles): value = d * CODEBOOK[q].

    Same nibble layout as Q4_0: element `i` low nibble of byte `i`, `i + 16` high nibble.
    """
    codes = unpack_bit_fields(blocks.view(torch.int16)[:, 1:9], 4, 8)
    out.copy_(_look_up(codes).view(out.shape))
    out.mul_(f16_field(blocks, 0))


def _iq4_xs_scales(blocks: torch.Tensor) -> torch.Tensor:
    """The 8 signed 6-bit sub-block scales of IQ4_XS as `(n, 8)` float32.

    Scale `j` has its low 4 bits in nibble `j % 2` of byte `4 + j // 2` and its top 2
    bits at bits `2j..2j+1` of the u16 at byte 2; the stored value is biased by 32.
    """
    n = blocks.shape[0]
    low = unpack_bit_fields(blocks.view(torch.int32)[:, 1:2], 4, 1)
    low_bits = low.view(torch.uint8).view(n, 2, 4).transpose(1, 2).reshape(n, 8).to(torch.int32)
    high_word = blocks.view(torch.int16)[:, 1:2].to(torch.int32)
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=blocks.device)
    high_bits = torch.bitwise_right_shift(high_word, shifts).bitwise_and_(3)
    scales = low_bits.bitwise_or_(high_bits.bitwise_left_shift_(4))
    return scales.sub_(32).to(torch.float32)


def decode_iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """IQ4_XS (136 bytes): fp16 d, u16 scale highs, 4 bytes of scale lows, 128 bytes of nibbles.

    Sub-block `j` (32 elements) is the low then high nibbles of bytes `16j..16j+15`;
    value = `d * (scale_j - 32) * CODEBOOK[q]`.
    """
    n = blocks.shape[0]
    codes = unpack_bit_fields(packed_words(blocks, 8, 136), 4, 2)
    out.copy_(_look_up(codes).view(out.shape))
    scale = f16_field(blocks, 0) * _iq4_xs_scales(blocks)
    out.view(n, 8, 32).mul_(scale.unsqueeze(-1))


DECODERS: Mapping[GGMLQuantizationType, BlockDecoder] = {
    GGMLQuantizationType.IQ4_NL: decode_iq4_nl,
    GGMLQuantizationType.IQ4_XS: decode_iq4_xs,
}
