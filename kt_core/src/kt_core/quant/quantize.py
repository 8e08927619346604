"""torch tensors → GGUF block bytes, for the GGML types `kt convert` writes.

gguf-py can read every K-quant but write none of them, so kt carries its own quantizers.
They follow ggml's reference algorithms (including the scale searches of the K-quants,
which matter for accuracy) but are vectorized torch code: all blocks of a chunk are
processed at once, and large tensors go through in chunks (`quantize_chunks`, which also
spreads them over the cores) so that the intermediates stay cache-sized however big the
tensor is.

The result is exactly what ``gguf.GGUFWriter.add_tensor(name, array, raw_dtype=T)``
expects: a ``uint8`` array shaped ``(*tensor.shape[:-1], bytes_per_row)``, from which the
writer recovers the logical shape. Float types are returned as bytes too, so a caller
never needs a special case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from .quantize_chunks import encode_in_chunks
from .quantize_errors import NonFiniteTensorError, QuantizationShapeError, UnsupportedQuantizationTypeError
from .quantize_float import encode_bf16, encode_f16, encode_f32
from .quantize_iquant import encode_iq4_nl, encode_iq4_xs
from .quantize_kquant_low import encode_q2_k, encode_q3_k
from .quantize_kquant_minmax import encode_q4_k, encode_q5_k
from .quantize_kquant_q6 import encode_q6_k
from .quantize_legacy import encode_q4_0, encode_q8_0

__all__ = [
    "QUANTIZABLE_TYPES",
    "NonFiniteTensorError",
    "QuantizationShapeError",
    "UnsupportedQuantizationTypeError",
    "can_quantize",
    "quantize",
]


@dataclass(frozen=True)
class _Format:
    """How to write one GGML type: block geometry and the block encoder.

    `encode` maps float32 blocks ``(n, block_size)`` to bytes ``(n, type_size)``.
    `chunk_elements` is the input handed to one `encode` call. Every op has a fixed
    dispatch cost of a few microseconds and the K-quant searches issue hundreds per
    call, which favours big chunks; but their handful of chunk-sized intermediates
    should stay in a core's L2 cache. 2^18 values (1 MiB as float32) measured best.
    """

    block_size: int
    type_size: int
    encode: Callable[[torch.Tensor], torch.Tensor]
    chunk_elements: int


_FORMATS: dict[str, _Format] = {
    "F32": _Format(1, 4, encode_f32, 1 << 20),
    "F16": _Format(1, 2, encode_f16, 1 << 20),
    "BF16": _Format(1, 2, encode_bf16, 1 << 20),
    "Q8_0": _Format(32, 34, encode_q8_0, 1 << 18),
    "Q4_0": _Format(32, 18, encode_q4_0, 1 << 18),
    "IQ4_NL": _Format(32, 18, encode_iq4_nl, 1 << 18),
    "Q2_K": _Format(256, 84, encode_q2_k, 1 << 18),
    "Q3_K": _Format(256, 110, encode_q3_k, 1 << 18),
    "Q4_K": _Format(256, 144, encode_q4_k, 1 << 18),
    "Q5_K": _Format(256, 176, encode_q5_k, 1 << 18),
    "Q6_K": _Format(256, 210, encode_q6_k, 1 << 18),
    "IQ4_XS": _Format(256, 136, encode_iq4_xs, 1 << 18),
}

QUANTIZABLE_TYPES: frozenset[str] = frozenset(_FORMATS)
"""GGML type names `quantize` can write."""


def _type_name(ggml_type: str | gguf.GGMLQuantizationType) -> str:
    """Canonical upper-case GGML type name for a name or enum member."""
    if isinstance(ggml_type, gguf.GGMLQuantizationType):
        return ggml_type.name
    return str(ggml_type).upper()


def _format(ggml_type: str | gguf.GGMLQuantizationType) -> tuple[str, _Format]:
    """The canonical name and format of a writable type, or `UnsupportedQuantizationTypeError`."""
    name = _type_name(ggml_type)
    fmt = _FORMATS.get(name)
    if fmt is None:
        supported = ", ".join(sorted(QUANTIZABLE_TYPES))
        raise UnsupportedQuantizationTypeError(f"cannot write GGML type {name!r}; supported types: {supported}")
    return name, fmt


def can_quantize(shape: Sequence[int], ggml_type: str | gguf.GGMLQuantizationType) -> bool:
    """Whether a tensor of `shape` can be written as `ggml_type` by `quantize`.

    False for types kt cannot write and for shapes whose last dimension is not a whole
    number of blocks (GGUF requires whole blocks per row), so `kt convert` can fall back
    to another type before doing any work.
    """
    fmt = _FORMATS.get(_type_name(ggml_type))
    return fmt is not None and len(shape) >= 1 and shape[-1] % fmt.block_size == 0


def quantize(tensor: torch.Tensor, ggml_type: str | gguf.GGMLQuantizationType) -> np.ndarray:
    """Encode `tensor` as `ggml_type` and return the GGUF bytes, shaped per row.

    Returns a C-contiguous ``uint8`` array of shape ``(*tensor.shape[:-1], bytes_per_row)``
    with ``bytes_per_row = tensor.shape[-1] // block_size * type_size``; pass it to
    ``GGUFWriter.add_tensor(name, array, raw_dtype=GGMLQuantizationType[ggml_type])``.
    Any float dtype and device is accepted; values are quantized from float32.

    Raises `QuantizationShapeError` when the last dimension is not a multiple of the
    block size, `UnsupportedQuantizationTypeError` for types outside
    `QUANTIZABLE_TYPES`, and `NonFiniteTensorError` when a block-quantized type is asked
    to store NaN or inf.
    """
    name, fmt = _format(ggml_type)
    shape = tuple(tensor.shape)
    if len(shape) == 0 or shape[-1] % fmt.block_size != 0:
        raise QuantizationShapeError(
            f"cannot quantize a tensor of shape {list(shape)} to {name}: the last dimension "
            f"must be a multiple of the {name} block size {fmt.block_size}"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor, got {tensor.dtype}")

    out = np.empty((*shape[:-1], shape[-1] // fmt.block_size * fmt.type_size), dtype=np.uint8)
    if out.size == 0:
        return out

    def check(chunk: torch.Tensor, first_block: int) -> None:
        if fmt.block_size > 1:
            _check_finite(chunk, first_block, shape, name)

    out_blocks = torch.from_numpy(out).view(-1, fmt.type_size)
    encode_in_chunks(tensor.detach(), out_blocks, fmt.block_size, fmt.chunk_elements, fmt.encode, check)
    return out


def _check_finite(chunk: torch.Tensor, first_block: int, shape: tuple[int, ...], name: str) -> None:
    """Raise `NonFiniteTensorError` naming a NaN/inf in `chunk`, if there is one.

    Chunks are checked by parallel workers, so the index named is the first in its
    chunk, not necessarily the first in the tensor.
    """
    finite = torch.isfinite(chunk)
    if bool(finite.all()):
        return
    flat = first_block * chunk.shape[1] + int((~finite).view(-1).nonzero()[0, 0])
    where = tuple(int(i) for i in np.unravel_index(flat, shape))
    raise NonFiniteTensorError(
        f"cannot quantize a tensor of shape {list(shape)} to {name}: it contains NaN or infinite "
        f"values (one at index {where})"
    )
