"""Registrations of kt-models-qwen (entry point ``kt-models-qwen`` in group ``kt``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from kt_core import OperatorKind, hookimpl
from kt_core.model_classes import register_transformers_classes
from kt_core.transfer import TransferMapKwargs
from kt_core.weights.family import GGUFMetadata, ModelFamily
from kt_core.weights.name_map import NameMap
from kt_models_qwen.kwargs import QwenMoeBlockKwargs

_CONFIGS = Path(__file__).parent / "configs"


def _classes(version: int) -> dict[str, tuple[str, ...]]:
    prefix = f"Qwen{version}Moe"
    kt = f"ktransformers.models.modeling_qwen{version}_moe"
    names = ["ForCausalLM", "Model", "DecoderLayer", "SparseMoeBlock", "MLP", "RMSNorm", "RotaryEmbedding"]
    classes: dict[str, tuple[str, ...]] = {f"{prefix}{n}": (f"{kt}.{prefix}{n}",) for n in names}
    classes[f"{prefix}Attention"] = (
        f"{kt}.{prefix}Attention", f"{kt}.{prefix}FlashAttention2", f"{kt}.{prefix}SdpaAttention",
    )
    classes[f"{prefix}Experts"] = ()
    classes[f"{prefix}TopKRouter"] = ()
    return classes


@hookimpl
def register_model_classes(register: Callable[..., None]) -> None:
    register_transformers_classes(register, "transformers.models.qwen2_moe.modeling_qwen2_moe", _classes(2))
    register_transformers_classes(register, "transformers.models.qwen3_moe.modeling_qwen3_moe", _classes(3))


def _name_map(config: PretrainedConfig, names: frozenset[str] | None) -> NameMap:
    from kt_models_qwen.gguf_names import name_map

    return name_map(config, names)


def _config_from_gguf(metadata: GGUFMetadata) -> PretrainedConfig:
    from kt_models_qwen.gguf_config import config_from_gguf

    return config_from_gguf(metadata)


def _gguf_metadata(config: PretrainedConfig) -> dict[str, Any]:
    from kt_models_qwen.gguf_config import gguf_metadata

    return gguf_metadata(config)


@hookimpl
def register_model_families(register: Callable[..., None]) -> None:
    register(ModelFamily(
        name="qwen-moe",
        hf_model_types=("qwen2_moe", "qwen3_moe"),
        gguf_architectures=("qwen2moe", "qwen3moe"),
        name_map=_name_map,
        config_from_gguf=_config_from_gguf,
        gguf_metadata=_gguf_metadata,
        builtin_configs={
            "Qwen/Qwen2-57B-A14B-Instruct": _CONFIGS / "Qwen2-57B-A14B-Instruct.json",
            "Qwen/Qwen2-57B-A14B": _CONFIGS / "Qwen2-57B-A14B-Instruct.json",
            "Qwen/Qwen3-30B-A3B": _CONFIGS / "Qwen3-30B-A3B.json",
        },
    ))


@hookimpl
def register_operators(register: Callable[..., None]) -> None:
    experts = "ktransformers.operators.experts"
    register(
        name="KQwen2MoeSparseMoeBlock",
        target="kt_models_qwen.moe:KQwen2MoeSparseMoeBlock",
        kind=OperatorKind.MODULE,
        summary="Qwen2-MoE block: float32 softmax top-k routing, routed experts overlapped with the shared expert",
        kwargs_model=QwenMoeBlockKwargs,
        aliases=(f"{experts}.KQwen2MoeSparseMoeBlock",),
    )
    register(
        name="KQwen3MoeSparseMoeBlock",
        target="kt_models_qwen.moe:KQwen3MoeSparseMoeBlock",
        kind=OperatorKind.MODULE,
        summary="Qwen3-MoE block: float32 softmax top-k routing, routed experts via submit/sync",
        kwargs_model=QwenMoeBlockKwargs,
        aliases=(f"{experts}.KQwen3MoeSparseMoeBlock",),
    )
    register(
        name="KQwen2MoeModel",
        target="kt_models_qwen.model:KQwen2MoeModel",
        kind=OperatorKind.MODULE,
        summary="Qwen2/Qwen3-MoE decoder stack with transfer_map (layer index -> device) for multi-device placement",
        kwargs_model=TransferMapKwargs,
        # KTransformers' Qwen2-57B rule file names it from its layer_wise_prefill module.
        aliases=("ktransformers.operators.models.KQwen2MoeModel", "ktransformers.operators.layer_wise_prefill.KQwen2MoeModel"),
    )
    register(
        name="KQwen3MoeModel",
        target="kt_models_qwen.model:KQwen3MoeModel",
        kind=OperatorKind.MODULE,
        summary="KQwen2MoeModel under the Qwen3 name (same forward, same transfer_map)",
        kwargs_model=TransferMapKwargs,
        aliases=("ktransformers.operators.models.KQwen3MoeModel",),
    )
