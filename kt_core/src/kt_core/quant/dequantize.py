"""Dequantize GGML tensors (the bytes of a GGUF tensor) into torch float tensors.

`dequantize` is the one entry point: it validates that the bytes match the shape and
type, moves the raw bytes (the smallest representation) to the target device, and
decodes them there with vectorized torch ops, so the same code serves CPU and CUDA.
Large tensors are decoded in chunks of blocks, written straight into the result, so the
temporaries a decoder needs stay a small, fixed size instead of scaling with the tensor.

The block formats themselves live in `legacy_quants`, `k_quants` and `iq_quants`; every
decoder is bit-exact against gguf-py's numpy reference (see `block_decoder`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kt_core.errors import KtUserError
from kt_core.quant import host_memory, iq_quants, k_quants, legacy_quants
from kt_core.quant.block_decoder import BlockDecoder

_FLOAT_STORAGE: Mapping[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
"""Types stored as plain floats: decoding is a (widening) copy, no blocks involved."""

_BLOCK_DECODERS: Mapping[GGMLQuantizationType, BlockDecoder] = {
    **legacy_quants.DECODERS,
    **k_quants.DECODERS,
    **iq_quants.DECODERS,
}

SUPPORTED_TYPES: frozenset[str] = frozenset(t.name for t in (*_FLOAT_STORAGE, *_BLOCK_DECODERS))
"""Names of the GGML types `dequantize` accepts (e.g. "Q4_K"), for messages and planning."""

_CPU_CHUNK_ELEMENTS_PER_THREAD = 1 << 20
"""Elements decoded per chunk and CPU thread.

About 1 Mi elements (4 MiB of float32 plus a few MiB of codes) per thread keeps a
chunk's temporaries in that thread's share of L2/L3 between the decoder's passes, while
being large enough that torch's fixed per-op cost (dispatch plus an OpenMP fork/join per
op) stays a small fraction. Measured on a 2-core EPYC with a 32 MiB L3: 2**20 to 2**21
elements per thread were fastest; 2**18 loses ~40% to per-op overhead and 2**22 ~30% to
cache misses.
"""

_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26
"""Elements per chunk elsewhere (CUDA): kernel launches cost more than CPU ops and device
memory bandwidth is plentiful, so chunks are large; temporaries stay below ~1 GiB."""

_ALIGNMENT = 8
"""Byte alignment decoders rely on to view blocks as int64 words."""


class UnsupportedGGMLTypeError(KtUserError):
    """The tensor uses a GGML type kt cannot dequantize (or a name that is no GGML type)."""

    def __init__(self, ggml_type: str) -> None:
        super().__init__(
            f"GGML type {ggml_type} is not supported for dequantization; "
            f"supported types: {', '.join(sorted(SUPPORTED_TYPES))}. "
            "Re-quantize the model to one of these, or pick a GGUF file that uses them."
        )
        self.ggml_type = ggml_type


class GGMLDataSizeError(KtUserError, ValueError):
    """The bytes given do not hold a tensor of the stated shape and GGML type.

    This usually means a truncated or corrupt GGUF file, or a shape/type mismatch in
    the caller; it is a `ValueError` so generic callers can treat it as bad input.
    """


def dequantize(
    data: torch.Tensor | np.ndarray,
    ggml_type: str | GGMLQuantizationType,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decode a GGML tensor's raw bytes into a new tensor of `shape`, `dtype` on `device`.

    `data` holds exactly the tensor's bytes as stored in the GGUF file, typically a
    numpy memmap slice; any dtype is reinterpreted as bytes (GGUFReader hands out F16
    and F32 tensors as float arrays), and contiguous input is used without a copy.
    `shape` is the logical PyTorch shape, outermost first (GGUF lists dims the other
    way round); its last dimension is the contiguous row and must be a multiple of the
    type's block size. The result is computed in float32 exactly as GGML does, then cast
    to `dtype`, so e.g. a bfloat16 result equals the float32 result cast to bfloat16.

    `device` defaults to `data`'s device (CPU for numpy). When it differs, the raw
    bytes are moved first and decoded on the target, which transfers 2-8x less than
    moving the decoded floats. The result never shares memory with `data`.

    Raises `UnsupportedGGMLTypeError` for types outside `SUPPORTED_TYPES` and
    `GGMLDataSizeError` when the byte count does not match the shape and type.
    """
    qtype = _resolve_type(ggml_type)
    dims = _check_shape(shape, qtype)
    if not dtype.is_floating_point:
        raise TypeError(f"dequantize produces floating point tensors; got dtype={dtype}")
    raw = _as_bytes(data)
    _check_byte_count(raw.numel(), dims, qtype)
    target = torch.device(device) if device is not None else raw.device
    raw = _aligned(raw.to(target))
    out = host_memory.empty(math.prod(dims), dtype, target)
    if out.numel() == 0:
        return out.view(dims)
    if qtype in _FLOAT_STORAGE:
        out.copy_(raw.view(_FLOAT_STORAGE[qtype]))
    else:
        _decode_blocks(raw, qtype, out)
    return out.view(dims)


def _resolve_type(ggml_type: str | GGMLQuantizationType) -> GGMLQuantizationType:
    if isinstance(ggml_type, GGMLQuantizationType):
        qtype = ggml_type
    elif isinstance(ggml_type, str):
        try:
            qtype = GGMLQuantizationType[ggml_type.upper()]
        except KeyError:
            raise UnsupportedGGMLTypeError(repr(ggml_type)) from None
    else:
        raise TypeError(f"ggml_type must be a str or gguf.GGMLQuantizationType, not {type(ggml_type).__name__}")
    if qtype.name not in SUPPORTED_TYPES:
        raise UnsupportedGGMLTypeError(qtype.name)
    return qtype


def _check_shape(shape: Sequence[int], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    block_size = GGML_QUANT_SIZES[qtype][0]
    if not dims or any(d < 0 for d in dims):
        raise GGMLDataSizeError(f"invalid shape {dims} for a {qtype.name} tensor: need one or more non-negative dims")
    if dims[-1] % block_size:
        raise GGMLDataSizeError(
            f"{qtype.name} tensor of shape {dims}: the last dimension ({dims[-1]}) must be a "
            f"multiple of the {qtype.name} block size ({block_size})"
        )
    return dims


def _check_byte_count(actual: int, dims: tuple[int, ...], qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = math.prod(dims) // block_size
    if actual != n_blocks * type_size:
        raise GGMLDataSizeError(
            f"{qtype.name} tensor of shape {dims} takes {n_blocks * type_size} bytes "
            f"({n_blocks} blocks of {type_size} bytes) but {actual} bytes were given; "
            "the GGUF file may be truncated or the shape/type may not belong to this data"
        )


def _as_bytes(data: torch.Tensor | np.ndarray) -> torch.Tensor:
    """`data` as a flat uint8 tensor, sharing its memory whenever it is contiguous."""
    if isinstance(data, torch.Tensor):
        flat = data.reshape(-1)
        return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    if isinstance(data, np.ndarray):
        array = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        with warnings.catch_warnings():
            # GGUF memmaps are read-only; torch warns because it cannot mark the tensor
            # read-only. We only ever read from it, and the result is a new tensor.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    raise TypeError(f"data must be a torch.Tensor or numpy.ndarray, not {type(data).__name__}")


def _aligned(raw: torch.Tensor) -> torch.Tensor:
    """`raw`, or an aligned copy of it if its first byte is not 8-byte aligned.

    GGUF aligns tensor data (32 bytes by default), so this copies only for unusual
    files or hand-sliced buffers.
    """
    if raw.data_ptr() % _ALIGNMENT or raw.storage_offset() % _ALIGNMENT:
        return raw.clone()
    return raw


def _chunk_elements(device: torch.device) -> int:
    """How many elements to decode per chunk on `device` (see the constants above)."""
    if device.type == "cpu":
        return _CPU_CHUNK_ELEMENTS_PER_THREAD * max(1, torch.get_num_threads())
    return _ACCELERATOR_CHUNK_ELEMENTS


def _decode_blocks(raw: torch.Tensor, qtype: GGMLQuantizationType, out: torch.Tensor) -> None:
    """Decode all blocks of `raw` into flat `out`, one chunk of blocks at a time.

    Float32 results go straight into `out`; other dtypes go through one chunk-sized
    float32 scratch buffer and are cast on the copy, keeping memory bounded either way.
    """
    decoder = _BLOCK_DECODERS[qtype]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = raw.numel() // type_size
    chunk_elements = _chunk_elements(out.device)
    # A multiple of 8 blocks, so every chunk starts 8-byte aligned whatever type_size is.
    chunk_blocks = max(_ALIGNMENT, chunk_elements // block_size // _ALIGNMENT * _ALIGNMENT)
    all_blocks = raw.view(n_blocks, type_size)
    out_blocks = out.view(n_blocks, block_size)
    scratch = None
    if out.dtype != torch.float32:
        scratch = torch.empty((min(chunk_blocks, n_blocks), block_size), dtype=torch.float32, device=out.device)
    for start in range(0, n_blocks, chunk_blocks):
        stop = min(start + chunk_blocks, n_blocks)
        if scratch is None:
            decoder(all_blocks[start:stop], out_blocks[start:stop])
        else:
            decoded = scratch[: stop - start]
            decoder(all_blocks[start:stop], decoded)
            out_blocks[start:stop].copy_(decoded)
