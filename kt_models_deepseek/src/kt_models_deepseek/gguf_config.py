"""DeepSeek-V2 / V2-Lite / V3 configs from GGUF ``deepseek2.*`` metadata, and back.

The keys and their meaning follow llama.cpp's converter and loader for ``deepseek2``:

- Routing decides the config class. ``expert_gating_func`` 2 (sigmoid, with the
  ``exp_probs_b`` correction bias) is DeepSeek-V3's ``noaux_tc`` router →
  `DeepseekV3Config`; 1 (softmax), or no key at all (files older than the key, which
  llama.cpp also reads as softmax) is DeepSeek-V2's router → `DeepseekV2Config`, with
  ``topk_method`` ``group_limited_greedy`` when ``expert_group_count`` > 1, else
  ``greedy``. Files converted before the converter wrote group counts are read as
  ``greedy``, since nothing in them says otherwise.
- Head sizes. Current files describe MLA as the MQA llama.cpp runs
  (``head_count_kv`` 1, ``key_length`` = kv_lora_rank + rope dims, ``value_length`` =
  kv_lora_rank) and give the real per-head sizes in ``key_length_mla`` /
  ``value_length_mla``; legacy files give the real sizes in ``key_length`` /
  ``value_length`` and ``head_count_kv`` = heads. Both are read. transformers' MLA always
  expands keys and values to every head, so ``num_key_value_heads`` is the head count.
- ``attention.q_lora_rank`` is absent for V2-Lite (a plain ``q_proj``).
- YaRN: the converter stores ``0.1 * mscale_all_dim`` as ``rope.scaling.yarn_log_multiplier``
  and llama.cpp's deepseek2 graph leaves cos/sin unscaled and scales q·k by
  ``(1 + log_mul · ln factor)²``. That is transformers' DeepSeek YaRN with
  ``mscale == mscale_all_dim == log_mul / 0.1``; without the key, an explicit
  ``attention_factor`` of 1 gives the same unscaled cos/sin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import DeepseekV2Config, DeepseekV3Config, PretrainedConfig

from kt_core.errors import KtUserError
from kt_core.weights.gguf_metadata import ArchMetadata, rope_metadata, rope_parameters, token_ids

ARCH = "deepseek2"
GATING_SOFTMAX = 1
GATING_SIGMOID = 2
_YARN_LOG_MUL_PER_MSCALE = 0.1


def config_from_gguf(metadata: Mapping[str, Any]) -> DeepseekV2Config | DeepseekV3Config:
    """The transformers config of the DeepSeek model a ``deepseek2`` GGUF file holds."""
    arch = metadata.get("general.architecture")
    if arch is not None and arch != ARCH:
        raise KtUserError(f"GGUF file has architecture {arch!r}; the DeepSeek plugin reads {ARCH!r} files")
    md = ArchMetadata(metadata, ARCH)
    rope_dim = md.as_int("rope.dimension_count")
    key_mla = md.get("attention.key_length_mla")
    if key_mla is not None:
        nope = int(key_mla) - rope_dim
        v_head_dim = md.as_int("attention.value_length_mla")
    else:
        nope = md.as_int("attention.key_length") - rope_dim
        v_head_dim = md.as_int("attention.value_length")
    heads = md.as_int("attention.head_count")
    q_lora = md.get("attention.q_lora_rank")
    gating = int(md.get("expert_gating_func", GATING_SOFTMAX))
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise KtUserError(
            f"GGUF metadata key '{ARCH}.expert_gating_func' is {gating}; DeepSeek models route with "
            f"softmax ({GATING_SOFTMAX}) or sigmoid ({GATING_SIGMOID})"
        )
    n_group = md.get("expert_group_count")
    topk_group = md.get("expert_group_used_count")
    common: dict[str, Any] = dict(
        vocab_size=md.vocab_size(),
        hidden_size=md.as_int("embedding_length"),
        intermediate_size=md.as_int("feed_forward_length"),
        moe_intermediate_size=md.as_int("expert_feed_forward_length"),
        num_hidden_layers=md.as_int("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_routed_experts=md.as_int("expert_count"),
        num_experts_per_tok=md.as_int("expert_used_count"),
        n_shared_experts=md.as_int("expert_shared_count"),
        first_k_dense_replace=md.as_int("leading_dense_block_count"),
        routed_scaling_factor=float(md.get("expert_weights_scale", 1.0)),
        norm_topk_prob=bool(md.get("expert_weights_norm", False)),
        kv_lora_rank=md.as_int("attention.kv_lora_rank"),
        q_lora_rank=None if q_lora is None else int(q_lora),
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=nope,
        v_head_dim=v_head_dim,
        max_position_embeddings=md.as_int("context_length"),
        rms_norm_eps=md.as_float("attention.layer_norm_rms_epsilon"),
        rope_parameters=_rope_parameters(md),
        tie_word_embeddings=False,
        **token_ids(metadata),
    )
    if gating == GATING_SIGMOID:
        return DeepseekV3Config(
            **common,
            architectures=["DeepseekV3ForCausalLM"],
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            n_group=1 if n_group is None else int(n_group),
            topk_group=1 if topk_group is None else int(topk_group),
            rope_interleave=True,
        )
    grouped = n_group is not None and int(n_group) > 1
    return DeepseekV2Config(
        **common,
        architectures=["DeepseekV2ForCausalLM"],
        scoring_func="softmax",
        n_group=None if n_group is None else int(n_group),
        topk_group=None if topk_group is None else int(topk_group),
        topk_method="group_limited_greedy" if grouped else "greedy",
    )


def gguf_metadata(config: PretrainedConfig) -> dict[str, Any]:
    """The ``deepseek2`` metadata the current llama.cpp converter writes for `config` (MLA form)."""
    if config.model_type not in ("deepseek_v2", "deepseek_v3"):
        raise KtUserError(f"cannot write {ARCH} GGUF metadata for a {config.model_type!r} config")
    p = f"{ARCH}."
    rank, rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
    md: dict[str, Any] = {
        "general.architecture": ARCH,
        p + "vocab_size": int(config.vocab_size),
        p + "context_length": int(config.max_position_embeddings),
        p + "embedding_length": int(config.hidden_size),
        p + "block_count": int(config.num_hidden_layers),
        p + "feed_forward_length": int(config.intermediate_size),
        p + "leading_dense_block_count": int(config.first_k_dense_replace or 0),
        p + "attention.head_count": int(config.num_attention_heads),
        p + "attention.head_count_kv": 1,
        p + "attention.kv_lora_rank": int(rank),
        p + "attention.key_length": int(rank + rope_dim),
        p + "attention.value_length": int(rank),
        p + "attention.key_length_mla": int(config.qk_nope_head_dim + rope_dim),
        p + "attention.value_length_mla": int(config.v_head_dim),
        p + "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        p + "rope.dimension_count": int(rope_dim),
        p + "expert_count": int(config.n_routed_experts),
        p + "expert_used_count": int(config.num_experts_per_tok),
        p + "expert_shared_count": int(config.n_shared_experts or 0),
        p + "expert_feed_forward_length": int(config.moe_intermediate_size),
        p + "expert_weights_scale": float(config.routed_scaling_factor),
        p + "expert_weights_norm": bool(config.norm_topk_prob),
        p + "expert_gating_func": GATING_SIGMOID if config.model_type == "deepseek_v3" else GATING_SOFTMAX,
    }
    if config.q_lora_rank is not None:
        md[p + "attention.q_lora_rank"] = int(config.q_lora_rank)
    if config.n_group is not None:
        md[p + "expert_group_count"] = int(config.n_group)
    if config.topk_group is not None:
        md[p + "expert_group_used_count"] = int(config.topk_group)
    md.update(_rope_metadata(config))
    return md


# -- rope -----------------------------------------------------------------------------


def _rope_parameters(md: ArchMetadata) -> dict[str, Any]:
    params = rope_parameters(md, "DeepSeek models")
    if params["rope_type"] != "yarn":
        return params
    log_mul = float(md.get("rope.scaling.yarn_log_multiplier", 0.0))
    if log_mul > 0:
        params["mscale"] = params["mscale_all_dim"] = log_mul / _YARN_LOG_MUL_PER_MSCALE
    else:
        params["attention_factor"] = 1.0
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = md.get(f"rope.scaling.{key}")
        if value is not None:
            params[name] = float(value)
    return params


def _rope_metadata(config: PretrainedConfig) -> dict[str, Any]:
    md = rope_metadata(config, ARCH)
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "yarn":
        return md
    p = f"{ARCH}.rope."
    if rope.get("mscale_all_dim"):
        md[p + "scaling.yarn_log_multiplier"] = _YARN_LOG_MUL_PER_MSCALE * float(rope["mscale_all_dim"])
    for name, key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if rope.get(name) is not None:
            md[p + f"scaling.{key}"] = float(rope[name])
    return md


__all__ = ["ARCH", "config_from_gguf", "gguf_metadata"]
