"""What a model plugin tells kt-core about a family of architectures.

A `ModelFamily` is registered by a model plugin (``kt-models-deepseek`` registers
``deepseek`` for transformers' ``deepseek_v2``/``deepseek_v3`` and GGUF's ``deepseek2``).
kt-core uses it to build a config from GGUF metadata, to map tensor names, and to write
GGUF files, without importing the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from kt_core.weights.name_map import NameMap

GGUFMetadata = Mapping[str, Any]
"""GGUF key/value metadata with plain Python values (``"deepseek2.block_count": 27``)."""


@dataclass(frozen=True)
class ModelFamily:
    """A family of architectures one model plugin knows how to run and load.

    - `name_map(config, gguf_tensor_names)` builds the transformers⇄GGUF name map for one
      model. `gguf_tensor_names` is the set of tensor names of the file being read (so the
      map can pick between GGUF variants, e.g. DeepSeek's ``attn_kv_b`` vs split
      ``attn_k_b``/``attn_v_b``), or None when writing (the map then uses the form the
      current llama.cpp converter writes).
    - `config_from_gguf(metadata)` builds the transformers config from GGUF metadata.
    - `gguf_metadata(config)` gives the architecture metadata `kt convert` writes.
    """

    name: str
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    name_map: Callable[[PretrainedConfig, frozenset[str] | None], NameMap]
    config_from_gguf: Callable[[GGUFMetadata], PretrainedConfig]
    gguf_metadata: Callable[[PretrainedConfig], dict[str, Any]]
    builtin_configs: Mapping[str, Path] = field(default_factory=dict)
    """Shipped config.json files by Hugging Face repo id, so models can be planned offline."""
    distribution: str = ""
