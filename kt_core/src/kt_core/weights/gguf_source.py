"""`GGUFSource`: a `WeightSource` over an opened GGUF file.

With a model plugin's `NameMap`, the source speaks transformers names: loading
``model.layers.3.self_attn.kv_b_proj.weight`` reads the GGUF tensors the mapping names,
dequantizes each and applies the mapping's ``to_hf``. Without a name map it speaks the
file's own tensor names, which is what tools that look at a file (``kt gguf``) want.

Plain storage types (F32, F16, BF16, F64 and the integer types) are reinterpreted here
directly; block-quantized types go through `kt_core.quant.dequantize`, imported only
when a quantized tensor is first loaded so that opening a file stays cheap.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kt_core.errors import KtUserError
from kt_core.weights.gguf_file import GGUFFile, GGUFTensor
from kt_core.weights.name_map import NameMap, TensorMapping
from kt_core.weights.source import MissingTensorError, RawTensor, TensorInfo

PLAIN_TYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}
"""GGML types whose bytes are simply an array of one torch dtype (no blocks)."""


class RawUnavailableError(KtUserError):
    """`raw()` was asked for a tensor that must be transformed, so has no stored bytes as-is."""


def _natural_dtype(ggml_types: Sequence[str]) -> torch.dtype:
    """The dtype `load` returns when none is asked for: the stored one if all parts share a
    plain type, float32 for quantized data (the precision dequantization produces)."""
    dtypes = {PLAIN_TYPES.get(t, torch.float32) for t in ggml_types}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _read_plain(tensor: GGUFTensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A plain-typed tensor as an independent copy in `dtype` on `device`."""
    stored = PLAIN_TYPES[tensor.ggml_type]
    if tensor.nbytes == 0:
        return torch.empty(tensor.shape, dtype=dtype, device=device)
    with warnings.catch_warnings():
        # The memory map is read-only; the view is copied below before anyone can write to it.
        warnings.simplefilter("ignore", UserWarning)
        view = torch.frombuffer(tensor._buffer, dtype=stored, count=tensor.n_elements, offset=tensor.offset)
    return view.reshape(tensor.shape).to(device=device, dtype=dtype, copy=True)


class UnsupportedTypeError(KtUserError):
    """A tensor's GGML type cannot be dequantized by kt."""


def _read(tensor: GGUFTensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if tensor.ggml_type in PLAIN_TYPES:
        return _read_plain(tensor, dtype, device)
    from kt_core.quant.dequantize import SUPPORTED_TYPES, dequantize

    if tensor.ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedTypeError(
            f"tensor {tensor.name!r} in {tensor.path} is stored as {tensor.ggml_type}, which kt cannot "
            f"dequantize (supported: {', '.join(sorted(set(PLAIN_TYPES) | set(SUPPORTED_TYPES)))}); use a "
            "GGUF file with a supported quantization, or an operator that computes on these blocks directly"
        )
    return dequantize(tensor.data, tensor.ggml_type, tensor.shape, dtype=dtype, device=device)


def supported_types() -> frozenset[str]:
    """Every GGML type a `GGUFSource` can `load`: plain types plus what `dequantize` handles."""
    from kt_core.quant.dequantize import SUPPORTED_TYPES

    return frozenset(PLAIN_TYPES) | frozenset(SUPPORTED_TYPES)


class GGUFSource:
    """Tensors of a GGUF file, by transformers name (with a `NameMap`) or by GGUF name.

    `names()` lists only names whose GGUF tensors are all in the file, so a plan made
    from it never asks for something that cannot be loaded.
    """

    def __init__(self, file: GGUFFile, name_map: NameMap | None = None, *, description: str | None = None) -> None:
        self.file = file
        self.name_map = name_map
        self.description = description or file.description
        self._shapes: dict[str, tuple[int, ...]] = {}

    # -- name resolution -------------------------------------------------------------

    def mapping(self, name: str) -> TensorMapping:
        """The mapping that produces `name`; `MissingTensorError` if the file lacks a part."""
        if self.name_map is None:
            if name not in self.file.tensors:
                raise MissingTensorError(name, self.description)
            return TensorMapping(name, (name,))
        mapping = self.name_map.get(name)
        if mapping is None:
            raise MissingTensorError(name, self.description)
        missing = [g for g in mapping.gguf_names if g not in self.file.tensors]
        if missing:
            raise MissingTensorError(
                name, f"{self.description} (it is made from GGUF tensor(s) {', '.join(map(repr, missing))}, which the file lacks)"
            )
        return mapping

    def gguf_tensors(self, name: str) -> list[GGUFTensor]:
        """The stored GGUF tensors `name` is made from, in the mapping's order."""
        return [self.file.tensors[g] for g in self.mapping(name).gguf_names]

    def names(self) -> Iterator[str]:
        if self.name_map is None:
            return iter(self.file.tensors)
        tensors = self.file.tensors
        return (m.hf_name for m in self.name_map if all(g in tensors for g in m.gguf_names))

    def has(self, name: str) -> bool:
        try:
            self.mapping(name)
        except MissingTensorError:
            return False
        return True

    # -- reading ---------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        mapping = self.mapping(name)
        parts = [self.file.tensors[g] for g in mapping.gguf_names]
        types = list(dict.fromkeys(t.ggml_type for t in parts))
        nbytes = sum(t.nbytes for t in parts)
        if mapping.is_identity:
            shape = parts[0].shape
        else:
            shape = self._transformed_shape(mapping, parts)
        return TensorInfo(name, shape, "+".join(types), nbytes)

    def _transformed_shape(self, mapping: TensorMapping, parts: list[GGUFTensor]) -> tuple[int, ...]:
        """Shape after `to_hf`, found by running it on meta tensors (no data is read).

        A transform that cannot run on meta tensors (one that looks at values) is run on
        the real data once instead; the result is cached either way.
        """
        shape = self._shapes.get(mapping.hf_name)
        if shape is None:
            try:
                meta = [torch.empty(t.shape, dtype=torch.float32, device="meta") for t in parts]
                shape = tuple(mapping.to_hf(meta).shape)
            except (NotImplementedError, RuntimeError, TypeError, ValueError):
                shape = tuple(self.load(mapping.hf_name).shape)
            self._shapes[mapping.hf_name] = shape
        return shape

    def load(
        self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        mapping = self.mapping(name)
        parts = [self.file.tensors[g] for g in mapping.gguf_names]
        target = dtype or _natural_dtype([t.ggml_type for t in parts])
        tensors = [_read(t, target, device) for t in parts]
        if mapping.is_identity:
            return tensors[0]
        return mapping.to_hf(tensors).to(device=device, dtype=target).contiguous()

    def raw(self, name: str) -> RawTensor:
        mapping = self.mapping(name)
        if not mapping.is_identity:
            raise RawUnavailableError(
                f"{name!r} in {self.description} is computed from GGUF tensor(s) "
                f"{', '.join(map(repr, mapping.gguf_names))} by a transform, so it has no stored bytes "
                "to read raw; use an operator that loads it dequantized for this tensor"
            )
        tensor = self.file.tensors[mapping.gguf_names[0]]
        return RawTensor(name, tensor.ggml_type, tensor.shape, tensor.data)


def unsupported_tensors(source: GGUFSource) -> list[tuple[str, str]]:
    """(name, GGML type) of every tensor of `source` that `load` cannot dequantize.

    Names are the ones `source` speaks (transformers names with a name map); for a tensor
    made of several GGUF tensors the first unsupported type is given. Called at plan time,
    so a model with an unsupported quantization fails before anything is loaded (or is
    planned onto an operator that computes on the raw blocks).
    """
    supported = supported_types()
    found: list[tuple[str, str]] = []
    for name in source.names():
        for tensor in source.gguf_tensors(name):
            if tensor.ggml_type not in supported:
                found.append((name, tensor.ggml_type))
                break
    return found



def undecodable_tensors_error(source: GGUFSource, path: str | Path) -> UnsupportedTypeError | None:
    """One error for every GGUF tensor of `source` whose type kt cannot decode, or None.

    Raised when the model is opened, before planning and loading, so an unusual
    quantization stops the run at once. Each GGUF tensor is named once, with its type
    and the transformers names the plan would read it as (an expert tensor is offered
    under several). No installed operator can use such a tensor: operators either read
    tensors dequantized by `kt_core.quant.dequantize` or compute on the blocks of a
    subset of its types (the CPU engine), so the error says which types would work.
    """
    found: dict[str, tuple[str, list[str]]] = {}
    for name, ggml_type in unsupported_tensors(source):
        for tensor in source.gguf_tensors(name):
            if tensor.ggml_type == ggml_type:
                found.setdefault(tensor.name, (ggml_type, []))[1].append(name)
                break
    if not found:
        return None
    shown = [
        f"{gguf_name} ({ggml_type}; read as {', '.join(hf_names)})"
        for gguf_name, (ggml_type, hf_names) in list(found.items())[:6]
    ]
    more = f"\n  … and {len(found) - 6} more" if len(found) > 6 else ""
    types = sorted({ggml_type for ggml_type, _ in found.values()})
    return UnsupportedTypeError(
        f"{path}: {len(found)} GGUF tensor(s) use GGML type(s) {', '.join(types)}, which no installed operator "
        f"can use:\n  " + "\n  ".join(shown) + more + "\n"
        f"Operators read weights dequantized by kt (supported: {', '.join(sorted(supported_types()))}) or "
        "compute on the blocks of some of those types; re-quantize the model to one of them "
        "(kt gguf inspect FILE lists the types a file uses)."
    )


__all__ = [
    "GGUFSource",
    "PLAIN_TYPES",
    "RawUnavailableError",
    "UnsupportedTypeError",
    "supported_types",
    "undecodable_tensors_error",
    "unsupported_tensors",
]
