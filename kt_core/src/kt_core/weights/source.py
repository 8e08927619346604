"""The weight-source contract: where an operator's `load()` gets its tensors from.

Operators never see file formats. They ask a `WeightSource` for tensors by their
*transformers* names (``model.layers.3.mlp.experts.gate_proj``); a source for a GGUF
file translates those names through the model plugin's name map, a safetensors source
reads them (stacking per-expert tensors where needed). Operators that compute on
quantized blocks (the CPU engine) ask for `raw()` instead of `load()` and get the bytes
untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class TensorInfo:
    """Shape and storage type of one tensor, known without reading its data.

    `shape` is in PyTorch order (outermost dimension first). `storage` is the GGML type
    name for GGUF tensors (``"Q4_K"``, ``"F32"``…) or the torch dtype name for others
    (``"bfloat16"``).
    """

    name: str
    shape: tuple[int, ...]
    storage: str
    nbytes: int


@dataclass(frozen=True)
class RawTensor:
    """The stored bytes of a tensor, exactly as in the file (memory-mapped where possible).

    `data` is a flat ``uint8`` array; `shape` is the logical PyTorch shape of the
    dequantized tensor; `ggml_type` is the GGML type name. Operators that compute on
    blocks read `data` directly and never make a dequantized copy.
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray


@runtime_checkable
class WeightSource(Protocol):
    """Read-only access to a model's tensors by transformers parameter name."""

    description: str
    """A short human-readable description (usually the path) used in error messages."""

    def names(self) -> Iterator[str]:
        """Every tensor name this source can provide."""
        ...

    def has(self, name: str) -> bool:
        """Whether `name` can be loaded."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Shape and storage type of `name`, without reading data."""
        ...

    def load(
        self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The tensor `name`, dequantized to `dtype` (its stored float type if None) on `device`."""
        ...

    def raw(self, name: str) -> RawTensor:
        """The stored bytes of `name` with their GGML type, for block-computing operators."""
        ...


class MissingTensorError(KeyError):
    """A tensor an operator asked for is not in the source."""

    def __init__(self, name: str, source: str) -> None:
        super().__init__(name)
        self.name = name
        self.source = source

    def __str__(self) -> str:
        return f"tensor {self.name!r} is not in {self.source}"


class StateDictSource:
    """A `WeightSource` over in-memory tensors (a state dict).

    Used to inject operators into a model whose weights already live in memory (for
    example a transformers model built in a test), and as the simplest reference source.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "state dict") -> None:
        self._tensors = dict(tensors)
        self.description = description

    def names(self) -> Iterator[str]:
        return iter(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensorError(name, self.description) from None

    def info(self, name: str) -> TensorInfo:
        t = self._get(name)
        return TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())

    def load(
        self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        t = self._get(name).detach()
        return t.to(device=device, dtype=dtype or t.dtype, copy=True)

    def raw(self, name: str) -> RawTensor:
        t = self._get(name).detach().contiguous().cpu()
        ggml_type = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(t.dtype)
        if ggml_type is None:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which has no GGML storage type")
        data = t.view(torch.uint8).reshape(-1).numpy()
        return RawTensor(name, ggml_type, tuple(t.shape), data)
