"""Reading weights for the engine: the stored bytes where possible, a float32 copy otherwise.

The engine multiplies the blocks of the file directly, so a GGUF tensor of a computable
type is handed over as the memory-mapped bytes `WeightSource.raw` returns (no copy, no
load time). Only tensors whose stored layout cannot be used as it is (a name made from
several GGUF tensors by a transform, or a torch dtype such as float8 that has no GGML
counterpart) are loaded as float32; those copies are counted in ``repacked_bytes`` so
`kt bench` can report the memory they cost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from kt_core.errors import KtUserError
from kt_core.quant.host_memory import populate
from kt_core.weights.source import WeightSource
from kt_ops_cpuinfer.weight_types import COMPUTABLE_TYPES, block_values, ggml_storage, is_ggml_name


class UnsupportedWeightTypeError(KtUserError):
    """A weight is stored in a GGML type the engine cannot compute on."""


@dataclass(frozen=True)
class EngineMatrix:
    """One (stacked) weight matrix as the engine reads it.

    Expert ``e``'s row ``r`` starts at ``address + e * expert_stride + r * row_stride``;
    `keepalive` holds the memory (a memory map view or a copy) for as long as the engine
    may read it.
    """

    name: str
    ggml_type: str
    rows: int
    cols: int
    row_stride: int
    expert_stride: int
    address: int
    keepalive: Any
    repacked_bytes: int
    experts: int = 1
    in_place: bool = True  # the source's own bytes (a memory map), not a copy made at load

    @property
    def mapped_bytes(self) -> int:
        """Bytes of this matrix read in place from the source's memory (0 for a copy made at load)."""
        return self.experts * self.rows * self.row_stride if self.in_place else 0

    def spec(self) -> tuple[int, str, int, int, int, int]:
        """The tuple the extension's constructors take."""
        return (self.address, self.ggml_type, self.rows, self.cols, self.row_stride, self.expert_stride)


def _tensor_label(source: WeightSource, name: str) -> str:
    """`name`, with the GGUF tensor(s) it comes from when the source can tell."""
    gguf_tensors = getattr(source, "gguf_tensors", None)
    if gguf_tensors is None:
        return name
    try:
        parts = [t.name for t in gguf_tensors(name)]
    except Exception:  # a source that cannot say is still fine to report by name
        return name
    return f"{name} (GGUF tensor {', '.join(parts)})" if parts and parts != [name] else name


_DEQUANTIZING_BACKEND = "a backend that dequantizes at load (KExpertsTorch, KLinearTorch) for this tensor"


def storage_problem(source: WeightSource, name: str, operator: str, alternative: str = _DEQUANTIZING_BACKEND) -> str | None:
    """Why `operator` cannot compute on tensor `name` as stored, or None if it can.

    Found from `source.info` alone (no data is read), so a plan fails before loading.
    `alternative` completes the advice "use a GGUF file quantized to one of those types, or …".
    """
    info = source.info(name)
    bad = [t for t in ggml_storage(info.storage) if is_ggml_name(t) and t not in COMPUTABLE_TYPES]
    if not bad:
        return None
    return (
        f"{_tensor_label(source, name)} in {source.description} is stored as {bad[0]}, which {operator} cannot "
        f"compute on; the CPU engine computes on {', '.join(COMPUTABLE_TYPES)}. Use a GGUF file quantized to one "
        f"of those types, or {alternative}"
    )


def _raw_or_none(source: WeightSource, name: str) -> Any:
    from kt_core.weights.gguf_source import RawUnavailableError

    try:
        return source.raw(name)
    except RawUnavailableError:
        return None


def read_matrix(source: WeightSource, name: str, shape: tuple[int, ...], operator: str) -> EngineMatrix:
    """Tensor `name` of logical `shape` ([E, rows, cols] stacked, or [rows, cols]) for the engine."""
    problem = storage_problem(source, name, operator)
    if problem is not None:
        raise UnsupportedWeightTypeError(problem)
    info = source.info(name)
    if tuple(info.shape) != tuple(shape):
        raise ValueError(f"{source.description}: {name} has shape {tuple(info.shape)}, expected {tuple(shape)}")
    types = ggml_storage(info.storage)
    raw = _raw_or_none(source, name) if len(types) == 1 and types[0] in COMPUTABLE_TYPES else None
    if raw is None:
        return float32_matrix(name, source.load(name, dtype=torch.float32), shape, source.description)
    matrix = _engine_matrix(name, shape, raw.ggml_type, raw.data, source.description, in_place=True)
    # The engine reads the file's pages in place: map them at load, not one fault (or a
    # disk read, once reclaimed) at a time in the middle of decode steps.
    populate(matrix.address, int(raw.data.nbytes))
    return matrix


def float32_matrix(name: str, tensor: torch.Tensor, shape: tuple[int, ...], description: str) -> EngineMatrix:
    """`tensor` as a float32 matrix for the engine: a copy made at load, counted as repacked."""
    copy = tensor.to(torch.float32).contiguous()
    return _engine_matrix(name, shape, "F32", copy.view(torch.uint8).reshape(-1).numpy(), description, in_place=False)


def _engine_matrix(
    name: str, shape: tuple[int, ...], ggml_type: str, data: np.ndarray, description: str, *, in_place: bool
) -> EngineMatrix:
    experts = shape[0] if len(shape) == 3 else 1
    rows, cols = shape[-2], shape[-1]
    if cols % block_values(ggml_type) != 0:
        raise ValueError(f"{name}: rows of {cols} values are not whole {ggml_type} blocks")
    row_bytes = cols // block_values(ggml_type) * _type_size(ggml_type)
    if data.nbytes != experts * rows * row_bytes:
        raise ValueError(
            f"{description}: {name} holds {data.nbytes} bytes, but {ggml_type} of shape {tuple(shape)} "
            f"needs {experts * rows * row_bytes}"
        )
    address = int(np.asarray(data).ctypes.data)
    repacked = 0 if in_place else int(data.nbytes)
    return EngineMatrix(name, ggml_type, rows, cols, row_bytes, rows * row_bytes, address, data, repacked, experts,
                        in_place=in_place)


def _type_size(ggml_type: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return int(GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]][1])



def row_slice(matrix: EngineMatrix, start: int, count: int) -> EngineMatrix:
    """Rows [start, start + count) of every expert of `matrix`, sharing its memory.

    Splits a fused ``gate_up_proj`` [E, 2I, H] into gate and up without a copy; the repacked
    bytes stay with the first half so they are counted once.
    """
    if start < 0 or count < 1 or start + count > matrix.rows:
        raise ValueError(f"rows [{start}, {start + count}) are outside the {matrix.rows} rows of {matrix.name}")
    return replace(
        matrix, rows=count, address=matrix.address + start * matrix.row_stride,
        repacked_bytes=matrix.repacked_bytes if start == 0 else 0,
    )
