"""Bit-field primitives for unpacking GGML blocks with a handful of whole-tensor torch ops.

GGML packs quants as 1-, 2- or 4-bit fields inside bytes. The speed of decoding them in
eager torch is governed by how torch's CPU kernels iterate, not by arithmetic:

* an op whose operands collapse to two dimensions (rows x contiguous run) costs a few
  nanoseconds per row, while one that needs three or more (e.g. writing every other
  32-byte group of a block) costs 3-10x more per row;
* a row shorter than a SIMD vector runs element by element, so the same bytes handled
  as int64 words cost an eighth of what they cost as uint8.

So every helper here works on *contiguous* tensors of 64-bit (or 32/16-bit) words that
each carry several packed bytes: `packed_words` first copies a field out of the blocks
(one cheap 2-D copy), `unpack_bit_fields` then shifts whole words into an element-order
layout with 2-D ops and masks all byte lanes in one contiguous pass. Masks repeat a byte
pattern (0x0F0F..., 0x0303...) so each byte lane behaves as if handled alone; shift
amounts are such that bits from neighbouring lanes (or an arithmetic shift's sign fill)
only ever land outside the mask.
"""

from __future__ import annotations

import torch

_WORD_BITS: dict[torch.dtype, int] = {torch.int16: 16, torch.int32: 32, torch.int64: 64}

_constants: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def byte_pattern(byte: int, dtype: torch.dtype) -> int:
    """`byte` repeated in every byte of a word of `dtype`, as the signed value torch needs.

    Masks such as 0xF0F0 do not fit a signed int16 as written; two's complement
    reinterpretation gives the same bit pattern in the range torch accepts.
    """
    bits = _WORD_BITS[dtype]
    value = int.from_bytes(bytes([byte]) * (bits // 8), "little")
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def constant(value: int, like: torch.Tensor) -> torch.Tensor:
    """A cached one-element tensor holding `value`, with `like`'s dtype and device.

    Broadcasting a one-element tensor keeps torch's CPU kernels on their vectorized
    path for strided rows (a Python scalar operand is about twice as slow there), and
    caching it avoids a host-to-device copy per call on accelerators.
    """
    key = (value, like.dtype, like.device)
    tensor = _constants.get(key)
    if tensor is None:
        tensor = torch.tensor([value], dtype=like.dtype, device=like.device)
        _constants[key] = tensor
    return tensor


def masked(words: torch.Tensor, byte_mask: int) -> torch.Tensor:
    """A new tensor: every byte of `words` ANDed with `byte_mask`."""
    return torch.bitwise_and(words, constant(byte_pattern(byte_mask, words.dtype), words))


def shift_into(words: torch.Tensor, left: int, out: torch.Tensor) -> None:
    """Write `words` shifted left by `left` bits (right if negative) into `out`."""
    if left > 0:
        torch.bitwise_left_shift(words, constant(left, words), out=out)
    elif left < 0:
        torch.bitwise_right_shift(words, constant(-left, words), out=out)
    else:
        out.copy_(words)


def packed_words(blocks: torch.Tensor, start: int, stop: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Bytes `start:stop` of every block, copied into a contiguous `(n, k)` tensor of `dtype` words.

    The copy reads the strided field through the widest word type the block layout
    allows (so it is a cheap 2-D copy) and the contiguous result can then be viewed as
    any word type whose size divides `stop - start`, which later ops need to coalesce.
    """
    type_size = blocks.shape[1]
    read_as = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8) if _fits(t, type_size, start, stop))
    field = blocks.view(read_as)[:, start // read_as.itemsize : stop // read_as.itemsize]
    # A fresh tensor rather than `.contiguous()`, which keeps the block stride when n == 1.
    return torch.empty(field.shape, dtype=read_as, device=field.device).copy_(field).view(dtype)


def _fits(dtype: torch.dtype, *offsets: int) -> bool:
    return all(offset % dtype.itemsize == 0 for offset in offsets)


def unpack_bit_fields(words: torch.Tensor, width: int, group_words: int, shift_to: int = 0) -> torch.Tensor:
    """Split every byte of `words` into its `8 // width` bit fields, group by group.

    `words` is a `(n, m)` word tensor, contiguous unless `group_words == m` (then
    strided rows, such as a field viewed in place inside the blocks, are fine). It is
    cut into groups of `group_words` consecutive words, and for each group the result
    holds field 0 of all its bytes, then field 1, and so on (field `f` is bits
    `width*f .. width*f + width - 1`), each moved to bit `shift_to` of its byte lane.
    Returns a new contiguous `(n, m * 8 // width)` tensor of the same word type.

    This is exactly GGML's packing: e.g. Q4_K stores sub-block `2j` in the low nibbles
    of 32-byte group `j` and sub-block `2j + 1` in the high nibbles, so with 4-word
    (32-byte) groups the result is in element order and needs no later shuffle.
    """
    n, m = words.shape
    fields = 8 // width
    groups = n * (m // group_words)
    planes = torch.empty((groups, fields, group_words), dtype=words.dtype, device=words.device)
    rows = words.view(groups, group_words)
    for field in range(fields):
        shift_into(rows, shift_to - width * field, planes[:, field])
    planes.bitwise_and_(constant(byte_pattern(((1 << width) - 1) << shift_to, words.dtype), planes))
    return planes.view(n, m * fields)


def bits_to_bytes(bits32: torch.Tensor) -> torch.Tensor:
    """Expand each bit of a `(n, 1)` int32 into its own byte: returns `(n, 8)` int32.

    Byte `i` of the result (little-endian across the 8 words) is bit `i` of the input,
    as 0 or 1. Each 4-bit group is multiplied by 0x00204081, which copies bit `k` of the
    group to bit `8k` (the partial products never overlap and the product stays below
    2**31), so the expansion takes four vectorized ops instead of 32 shift-and-mask
    passes.
    """
    groups = torch.bitwise_right_shift(bits32, torch.arange(0, 32, 4, dtype=torch.int32, device=bits32.device))
    groups.bitwise_and_(constant(0xF, groups))
    groups.mul_(constant(0x00204081, groups))
    groups.bitwise_and_(constant(byte_pattern(0x01, torch.int32), groups))
    return groups


def offset_codes_to_float(codes: torch.Tensor, offset: int, out: torch.Tensor) -> None:
    """Write `codes - offset` into float32 `out`, for uint8 codes whose difference fits int8.

    Subtracting in uint8 wraps modulo 256, which is exactly the int8 two's complement
    encoding of the signed quant, so one conversion pass replaces a float conversion
    followed by a float subtraction. `codes` is modified in place.
    """
    codes.sub_(offset)
    out.copy_(codes.view(torch.int8).view(out.shape))


def f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 scalar at byte `offset` of every block, widened exactly to `(n, 1)` float32."""
    return blocks[:, offset : offset + 2].view(torch.float16).to(torch.float32)
