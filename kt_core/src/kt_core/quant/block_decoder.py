"""The contract every GGML block decoder in `kt_core.quant` follows.

A GGML tensor is a sequence of fixed-size blocks; each format module (legacy, k-quants,
i-quants) supplies one decoder per block format. Keeping the contract this narrow lets
`dequantize` own everything that is not format-specific (validation, chunking to bound
memory, device placement, output dtype) and lets each decoder be tested bit for bit
against gguf-py's numpy reference on its own.
"""

from __future__ import annotations

from typing import Protocol

import torch


class BlockDecoder(Protocol):
    """Turns a batch of blocks of one GGML format into float32 values.

    `blocks` is a contiguous `(n, type_size)` uint8 tensor whose first byte is aligned
    to 8 bytes, so decoders may reinterpret it as 16/32/64-bit words (whichever divides
    `type_size`) instead of working byte by byte, which torch runs several times slower.
    `out` is a contiguous `(n, block_size)` float32 tensor on the same device; the
    decoder writes every element of it and returns nothing, so the caller decides where
    results land (straight into the final tensor, or a scratch buffer before a cast).

    Decoders must perform the same float32 operations, in the same order, as the GGML
    reference (scale times quant, then minus/plus the offset), so the results are
    bit-identical to gguf-py and llama.cpp rather than merely close.
    """

    def __call__(self, blocks: torch.Tensor, out: torch.Tensor) -> None: ...
