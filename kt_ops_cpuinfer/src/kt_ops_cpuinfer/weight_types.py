"""The storage types the engine computes on, and naming a tensor's storage as a GGML type.

Sources describe storage either as a GGML type name (GGUF: ``"Q4_K"``) or as a torch dtype
name (state dicts, safetensors: ``"bfloat16"``); the engine speaks GGML names only.
"""

from __future__ import annotations

from kt_ops_cpuinfer import _engine

COMPUTABLE_TYPES: tuple[str, ...] = tuple(_engine.weight_types())
"""GGML types the kernels multiply directly: F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K."""

_DTYPE_TO_GGML = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def ggml_storage(storage: str) -> list[str]:
    """The GGML type name(s) of a `TensorInfo.storage` string (``"Q4_K+Q6_K"`` has two)."""
    return [_DTYPE_TO_GGML.get(part, part) for part in storage.split("+")]


def is_ggml_name(name: str) -> bool:
    """Whether `name` is a GGML type name (as opposed to a torch dtype such as float8_e4m3fn)."""
    import gguf

    return name in gguf.GGMLQuantizationType.__members__


def block_values(ggml_type: str) -> int:
    """Values per block of a computable type (1 for plain floats)."""
    return int(_engine.block_values(ggml_type))
