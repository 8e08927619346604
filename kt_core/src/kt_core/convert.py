"""Writing GGUF files: `kt convert` and the synthetic benchmark models.

The writer streams: tensor shapes and types are worked out first (on ``meta`` tensors,
no data), the header is written, then each tensor is read from the source, transformed
to its GGUF layout through the model family's name map, quantized and written before the
next is read. Peak memory is one tensor, not the model.

Type choice follows llama.cpp's conventions: 1-D tensors and those the name map marks
``keep_f32`` (norms, router, biases) stay F32; a tensor whose rows do not divide into the
requested type's blocks (the K-quants and IQ4_XS need multiples of 256) falls back to
Q8_0 (32-element blocks), and to F16 if even that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from kt_core.errors import KtUserError
from kt_core.quant.quantize import QUANTIZABLE_TYPES, can_quantize, quantize
from kt_core.registry import Registry
from kt_core.runtime.progress import progress
from kt_core.weights.family import ModelFamily
from kt_core.weights.gguf_tokenizer import tokenizer_to_gguf_metadata
from kt_core.weights.name_map import NameMap, TensorMapping
from kt_core.weights.source import WeightSource

FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "IQ4_NL": gguf.LlamaFileType.MOSTLY_IQ4_NL,
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "IQ4_XS": gguf.LlamaFileType.MOSTLY_IQ4_XS,
}
"""Types `kt convert --type` accepts, with the ``general.file_type`` they declare."""

TOKENIZER_PRE = {"deepseek_v2": "deepseek-llm", "deepseek_v3": "deepseek-v3", "qwen2_moe": "qwen2", "qwen3_moe": "qwen2"}
"""``tokenizer.ggml.pre`` llama.cpp uses for each model type's pre-tokenizer."""


@dataclass(frozen=True)
class PlannedTensor:
    gguf_name: str
    mapping: TensorMapping
    index: int  # position of this tensor among the mapping's GGUF outputs
    shape: tuple[int, ...]
    ggml_type: str


def choose_type(shape: tuple[int, ...], requested: str, keep_f32: bool) -> str:
    """The GGML type a tensor of `shape` is written in, for a requested file type."""
    if keep_f32 or len(shape) == 1 or requested == "F32":
        return "F32"
    for candidate in (requested, "Q8_0", "F16"):
        if can_quantize(shape, candidate):
            return candidate
    return "F32"


def _primary_mappings(name_map: Any, source: WeightSource) -> tuple[list[TensorMapping], list[str]]:
    """One mapping per GGUF tensor, among those the source can provide; and what cannot be covered.

    Expert weights have two transformers spellings (fused ``gate_up_proj`` and split
    ``gate_proj``/``up_proj``) over the same GGUF tensors; each GGUF tensor is written once,
    preferring a mapping that produces it alone (identity) when the source has it.
    """
    chosen: dict[str, TensorMapping] = {}
    available = [m for m in name_map if source.has(m.hf_name)]
    for mapping in sorted(available, key=lambda m: (not m.is_identity, m.hf_name)):
        if all(name in chosen for name in mapping.gguf_names):
            continue
        for name in mapping.gguf_names:
            chosen.setdefault(name, mapping)
    unique: list[TensorMapping] = []
    for mapping in chosen.values():
        if mapping not in unique:
            unique.append(mapping)
    missing = sorted({m.hf_name for m in name_map if not all(n in chosen for n in m.gguf_names)})
    return unique, missing


def plan_tensors(
    source: WeightSource, config: PretrainedConfig, family: ModelFamily, ggml_type: str,
    name_map: NameMap | None = None,
) -> list[PlannedTensor]:
    """Every tensor the GGUF will hold, with its shape and type, computed without reading data.

    `name_map` defaults to the family's map for writing (the tensor layout the current
    llama.cpp converter produces); passing another writes another layout (tests use it to
    write DeepSeek's older ``attn_kv_b`` form).
    """
    name_map = name_map if name_map is not None else family.name_map(config, None)
    planned: list[PlannedTensor] = []
    mappings, missing = _primary_mappings(name_map, source)
    for mapping in mappings:
        meta = torch.empty(source.info(mapping.hf_name).shape, device="meta")
        for index, (name, out) in enumerate(zip(mapping.gguf_names, mapping.to_gguf(meta), strict=True)):
            shape = tuple(out.shape)
            planned.append(PlannedTensor(name, mapping, index, shape, choose_type(shape, ggml_type, mapping.keep_f32)))
    if missing:
        shown = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        raise KtUserError(f"{source.description}: {len(missing)} tensors the model needs are missing: {shown}")
    return planned


def _add_metadata(writer: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    for key, value in metadata.items():
        if key == "general.architecture":
            continue  # the writer adds it from its arch
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        else:
            raise TypeError(f"metadata {key!r} has unsupported type {type(value).__name__}")


def write_gguf(
    out_path: Path,
    source: WeightSource,
    config: PretrainedConfig,
    registry: Registry,
    *,
    ggml_type: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    name: str | None = None,
    show_progress: bool | None = None,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
    name_map: NameMap | None = None,
) -> list[PlannedTensor]:
    """Write `source` as a GGUF file for llama.cpp and kt; return what was written."""
    if ggml_type not in FILE_TYPES:
        raise KtUserError(f"--type {ggml_type}: expected one of {', '.join(FILE_TYPES)}")
    assert ggml_type in QUANTIZABLE_TYPES
    family = registry.family_for_model_type(config.model_type)
    if family is None:
        raise KtUserError(f"no installed model plugin can write model_type {config.model_type!r}")
    arch = family.gguf_architectures[0]
    metadata = dict(family.gguf_metadata(config))
    arch = metadata.get("general.architecture", arch)
    planned = plan_tensors(source, config, family, ggml_type, name_map)

    tmp_path = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp_path), arch)
    try:
        writer.add_name(name or getattr(config, "_name_or_path", "") or config.model_type)
        writer.add_file_type(int(FILE_TYPES[ggml_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_metadata(writer, metadata)
        if tokenizer is not None:
            pre = TOKENIZER_PRE.get(config.model_type, "default")
            _add_metadata(writer, tokenizer_to_gguf_metadata(tokenizer, pre, vocab_size=config.vocab_size))
        for t in planned:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml_type]]
            nbytes = int(np.prod(t.shape[:-1], dtype=np.int64)) * (t.shape[-1] // block) * type_size
            byte_shape = (*t.shape[:-1], t.shape[-1] // block * type_size)
            writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[t.ggml_type])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        current: tuple[str, list[torch.Tensor]] | None = None
        for t in progress(planned, total=len(planned), desc=f"writing {out_path.name}", unit="tensor",
                          enabled=show_progress):
            if current is None or current[0] != t.mapping.hf_name:
                hf = source.load(t.mapping.hf_name, dtype=torch.float32)
                current = (t.mapping.hf_name, t.mapping.to_gguf(hf))
            data = quantize(current[1][t.index].contiguous(), t.ggml_type)
            writer.write_tensor_data(np.ascontiguousarray(data))
            if on_tensor is not None:
                on_tensor(t)
        writer.close()
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    tmp_path.replace(out_path)
    return planned
