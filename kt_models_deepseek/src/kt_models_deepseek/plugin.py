"""Registrations of kt-models-deepseek (entry point ``kt-models-deepseek`` in group ``kt``)."""

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
from kt_models_deepseek.kwargs import DeepseekMoEKwargs, MLAAttentionKwargs, RotaryKwargs

_CONFIGS = Path(__file__).parent / "configs"
_KT_V2 = "ktransformers.models.modeling_deepseek"
_KT_V3 = "ktransformers.models.modeling_deepseek_v3"
_KT_OPS = "ktransformers.operators"


@hookimpl
def register_operators(register: Callable[..., None]) -> None:
    register(
        name="KDeepseekV2Attention",
        target="kt_models_deepseek.mla_attention:KDeepseekV2Attention",
        kind=OperatorKind.MODULE,
        summary="DeepSeek MLA attention with kv_b_proj absorbed; caches only the compressed latent",
        kwargs_model=MLAAttentionKwargs,
        aliases=(f"{_KT_OPS}.attention.KDeepseekV2Attention",),
    )
    register(
        name="KDeepseekV2MoE",
        target="kt_models_deepseek.moe:KDeepseekV2MoE",
        kind=OperatorKind.MODULE,
        summary="DeepSeek-V2 MoE block: softmax routing, shared experts overlapped with routed experts",
        kwargs_model=DeepseekMoEKwargs,
        aliases=(f"{_KT_OPS}.experts.KDeepseekV2MoE",),
    )
    register(
        name="KDeepseekV3MoE",
        target="kt_models_deepseek.moe:KDeepseekV3MoE",
        kind=OperatorKind.MODULE,
        summary="DeepSeek-V3 MoE block: sigmoid group-limited routing, shared experts overlapped with routed experts",
        kwargs_model=DeepseekMoEKwargs,
        aliases=(f"{_KT_OPS}.experts.KDeepseekV3MoE",),
    )
    register(
        name="YarnRotaryEmbedding",
        target="kt_models_deepseek.rope:YarnRotaryEmbedding",
        kind=OperatorKind.MODULE,
        summary="DeepSeek rotary embedding whose frequencies (any rope type, YaRN included) are computed at load",
        kwargs_model=RotaryKwargs,
        # KTransformers' V3 rule files name a separate V3 class; ours computes any rope type from the config.
        aliases=(f"{_KT_OPS}.RoPE.YarnRotaryEmbedding", f"{_KT_OPS}.RoPE.YarnRotaryEmbeddingV3"),
    )
    register(
        name="KDeepseekV2Model",
        target="kt_models_deepseek.model:KDeepseekV2Model",
        kind=OperatorKind.MODULE,
        summary="DeepSeek decoder stack with a transfer_map moving activations between layer devices",
        kwargs_model=TransferMapKwargs,
        aliases=(f"{_KT_OPS}.models.KDeepseekV2Model",),
    )
    register(
        name="KDeepseekV3Model",
        target="kt_models_deepseek.model:KDeepseekV3Model",
        kind=OperatorKind.MODULE,
        summary="KDeepseekV2Model under the DeepSeek-V3 name (same decoder stack with transfer_map)",
        kwargs_model=TransferMapKwargs,
    )


@hookimpl
def register_model_classes(register: Callable[..., None]) -> None:
    register_transformers_classes(register, "transformers.models.deepseek_v2.modeling_deepseek_v2", {
        "DeepseekV2ForCausalLM": (f"{_KT_V2}.DeepseekV2ForCausalLM",),
        "DeepseekV2Model": (f"{_KT_V2}.DeepseekV2Model",),
        "DeepseekV2DecoderLayer": (f"{_KT_V2}.DeepseekV2DecoderLayer",),
        "DeepseekV2Attention": (f"{_KT_V2}.DeepseekV2Attention", f"{_KT_V2}.DeepseekV2FlashAttention2"),
        "DeepseekV2Moe": ("DeepseekV2MoE", f"{_KT_V2}.DeepseekV2MoE"),
        "DeepseekV2Experts": (),
        "DeepseekV2TopkRouter": (f"{_KT_V2}.MoEGate",),
        "DeepseekV2MLP": (f"{_KT_V2}.DeepseekV2MLP",),
        "DeepseekV2RMSNorm": (f"{_KT_V2}.DeepseekV2RMSNorm",),
        # transformers 5 has one rotary module whose rope_type (yarn, linear…) comes from
        # the config, where the 2024 remote code had a class per scaling kind.
        "DeepseekV2RotaryEmbedding": (
            f"{_KT_V2}.DeepseekV2RotaryEmbedding",
            f"{_KT_V2}.DeepseekV2YarnRotaryEmbedding",
            f"{_KT_V2}.DeepseekV2LinearScalingRotaryEmbedding",
            f"{_KT_V2}.DeepseekV2DynamicNTKScalingRotaryEmbedding",
        ),
    })
    register_transformers_classes(register, "transformers.models.deepseek_v3.modeling_deepseek_v3", {
        "DeepseekV3ForCausalLM": (f"{_KT_V3}.DeepseekV3ForCausalLM",),
        "DeepseekV3Model": (f"{_KT_V3}.DeepseekV3Model",),
        "DeepseekV3DecoderLayer": (f"{_KT_V3}.DeepseekV3DecoderLayer",),
        "DeepseekV3Attention": (f"{_KT_V3}.DeepseekV3Attention",),
        "DeepseekV3MoE": (f"{_KT_V3}.DeepseekV3MoE",),
        "DeepseekV3Experts": (),
        "DeepseekV3TopkRouter": (f"{_KT_V3}.MoEGate",),
        "DeepseekV3MLP": (f"{_KT_V3}.DeepseekV3MLP",),
        "DeepseekV3RMSNorm": (f"{_KT_V3}.DeepseekV3RMSNorm",),
        "DeepseekV3RotaryEmbedding": (
            f"{_KT_V3}.DeepseekV3RotaryEmbedding",
            f"{_KT_V3}.DeepseekV3YarnRotaryEmbedding",
        ),
    })


def _name_map(config: PretrainedConfig, names: frozenset[str] | None) -> NameMap:
    from kt_models_deepseek.gguf_names import name_map

    return name_map(config, names)


def _config_from_gguf(metadata: GGUFMetadata) -> PretrainedConfig:
    from kt_models_deepseek.gguf_config import config_from_gguf

    return config_from_gguf(metadata)


def _gguf_metadata(config: PretrainedConfig) -> dict[str, Any]:
    from kt_models_deepseek.gguf_config import gguf_metadata

    return gguf_metadata(config)


@hookimpl
def register_model_families(register: Callable[..., None]) -> None:
    register(ModelFamily(
        name="deepseek",
        hf_model_types=("deepseek_v2", "deepseek_v3"),
        gguf_architectures=("deepseek2",),
        name_map=_name_map,
        config_from_gguf=_config_from_gguf,
        gguf_metadata=_gguf_metadata,
        builtin_configs={
            "deepseek-ai/DeepSeek-V2-Lite-Chat": _CONFIGS / "DeepSeek-V2-Lite-Chat.json",
            "deepseek-ai/DeepSeek-V2-Lite": _CONFIGS / "DeepSeek-V2-Lite-Chat.json",
            "deepseek-ai/DeepSeek-V2-Chat": _CONFIGS / "DeepSeek-V2-Chat.json",
            "deepseek-ai/DeepSeek-V2": _CONFIGS / "DeepSeek-V2-Chat.json",
            "deepseek-ai/DeepSeek-V3": _CONFIGS / "DeepSeek-V3.json",
            "deepseek-ai/DeepSeek-R1": _CONFIGS / "DeepSeek-V3.json",
        },
    ))
