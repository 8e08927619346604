"""Qwen2-MoE / Qwen3-MoE configs from GGUF ``qwen2moe.*`` / ``qwen3moe.*`` metadata, and back.

``general.architecture`` picks the config class. The keys follow llama.cpp's converter and
loader:

- Routing normalization is not in the files the converter writes: llama.cpp hard-codes it
  per graph (``qwen3moe`` renormalizes the top-k weights, ``qwen2moe`` does not), so that
  is the default for ``norm_topk_prob``; an ``expert_weights_norm`` key, which kt writes,
  overrides it.
- Qwen3-MoE's head size is ``attention.key_length`` (the converter writes ``head_dim``,
  which is not ``hidden_size / heads`` for Qwen3-30B-A3B); Qwen2-MoE files have no such
  key and use ``hidden_size / heads``.
- Biases are not described by metadata either; Qwen2-MoE always has q/k/v biases and
  Qwen3-MoE none, which are the transformers defaults.
- Every layer is a MoE layer in llama.cpp's graphs, so configs read from GGUF have no
  ``mlp_only_layers`` and a ``decoder_sparse_step`` of 1, and `gguf_metadata` refuses
  configs with dense layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

from kt_core.errors import KtUserError
from kt_core.weights.gguf_metadata import ArchMetadata, rope_metadata, rope_parameters, token_ids
from kt_models_qwen.gguf_names import is_sparse_layer

QWEN2MOE = "qwen2moe"
QWEN3MOE = "qwen3moe"
ARCHITECTURES = (QWEN2MOE, QWEN3MOE)
_MODEL_TYPES = {"qwen2_moe": QWEN2MOE, "qwen3_moe": QWEN3MOE}


def config_from_gguf(metadata: Mapping[str, Any]) -> Qwen2MoeConfig | Qwen3MoeConfig:
    """The transformers config of the Qwen MoE model a ``qwen2moe`` / ``qwen3moe`` GGUF file holds."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise KtUserError(
            f"GGUF file has architecture {arch!r}; the Qwen plugin reads {' and '.join(map(repr, ARCHITECTURES))} files"
        )
    md = ArchMetadata(metadata, arch)
    hidden = md.as_int("embedding_length")
    heads = md.as_int("attention.head_count")
    common: dict[str, Any] = dict(
        vocab_size=md.vocab_size(),
        hidden_size=hidden,
        intermediate_size=md.as_int("feed_forward_length"),
        moe_intermediate_size=md.as_int("expert_feed_forward_length"),
        num_hidden_layers=md.as_int("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=int(md.get("attention.head_count_kv", heads)),
        num_experts=md.as_int("expert_count"),
        num_experts_per_tok=md.as_int("expert_used_count"),
        norm_topk_prob=bool(md.get("expert_weights_norm", arch == QWEN3MOE)),
        max_position_embeddings=md.as_int("context_length"),
        rms_norm_eps=md.as_float("attention.layer_norm_rms_epsilon"),
        rope_parameters=_rope_parameters(md),
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        **token_ids(metadata),
    )
    if arch == QWEN2MOE:
        return Qwen2MoeConfig(
            **common,
            architectures=["Qwen2MoeForCausalLM"],
            shared_expert_intermediate_size=md.as_int("expert_shared_feed_forward_length"),
        )
    return Qwen3MoeConfig(
        **common,
        architectures=["Qwen3MoeForCausalLM"],
        head_dim=int(md.get("attention.key_length", hidden // heads)),
    )


def gguf_metadata(config: PretrainedConfig) -> dict[str, Any]:
    """The ``qwen2moe`` / ``qwen3moe`` metadata for `config`, as the llama.cpp converter writes it."""
    arch = _MODEL_TYPES.get(config.model_type)
    if arch is None:
        raise KtUserError(f"cannot write Qwen MoE GGUF metadata for a {config.model_type!r} config")
    dense = [i for i in range(config.num_hidden_layers) if not is_sparse_layer(config, i)]
    if dense:
        raise KtUserError(
            f"layers {dense} of this {config.model_type} config have no experts (mlp_only_layers / "
            f"decoder_sparse_step); llama.cpp's {arch} runs experts in every layer, so it cannot be written as {arch}"
        )
    p = f"{arch}."
    md: dict[str, Any] = {
        "general.architecture": arch,
        p + "vocab_size": int(config.vocab_size),
        p + "context_length": int(config.max_position_embeddings),
        p + "embedding_length": int(config.hidden_size),
        p + "block_count": int(config.num_hidden_layers),
        p + "feed_forward_length": int(config.intermediate_size),
        p + "attention.head_count": int(config.num_attention_heads),
        p + "attention.head_count_kv": int(config.num_key_value_heads),
        p + "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        p + "expert_count": int(config.num_experts),
        p + "expert_used_count": int(config.num_experts_per_tok),
        p + "expert_feed_forward_length": int(config.moe_intermediate_size),
        p + "expert_weights_norm": bool(config.norm_topk_prob),
    }
    if arch == QWEN2MOE:
        md[p + "expert_shared_feed_forward_length"] = int(config.shared_expert_intermediate_size)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        md[p + "attention.key_length"] = int(head_dim)
        md[p + "attention.value_length"] = int(head_dim)
    md.update(_rope_metadata(config, arch))
    return md


# -- rope -----------------------------------------------------------------------------

_YARN_KEYS = (
    ("yarn_ext_factor", "extrapolation_factor"),
    ("yarn_attn_factor", "attention_factor"),
    ("yarn_beta_fast", "beta_fast"),
    ("yarn_beta_slow", "beta_slow"),
)
"""Optional YaRN keys: GGUF ``rope.scaling.*`` name ↔ transformers ``rope_parameters`` name."""


def _rope_parameters(md: ArchMetadata) -> dict[str, Any]:
    params = rope_parameters(md, "Qwen MoE models")
    if params["rope_type"] == "yarn":
        for key, name in _YARN_KEYS:
            value = md.get(f"rope.scaling.{key}")
            if value is not None:
                params[name] = float(value)
    return params


def _rope_metadata(config: PretrainedConfig, arch: str) -> dict[str, Any]:
    md = rope_metadata(config, arch)
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") == "yarn":
        for key, name in _YARN_KEYS:
            if rope.get(name) is not None:
                md[f"{arch}.rope.scaling.{key}"] = float(rope[name])
    return md


__all__ = ["ARCHITECTURES", "QWEN2MOE", "QWEN3MOE", "config_from_gguf", "gguf_metadata"]
