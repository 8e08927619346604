"""Tiny random models of each supported architecture, built by the tests themselves.

Sizes are the smallest that still exercise every code path (several experts, top-k > 1,
a dense first layer for DeepSeek, MLA with and without q_lora_rank). Nothing downloads.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)


def deepseek_v2_config(*, q_lora_rank: int | None = 32, **overrides) -> DeepseekV2Config:
    """DeepSeek-V2 shaped (q_lora_rank set) or V2-Lite shaped (q_lora_rank=None)."""
    cfg = dict(
        _COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1, q_lora_rank=q_lora_rank,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0,
    )
    cfg.update(overrides)
    return DeepseekV2Config(**cfg)


def deepseek_v3_config(**overrides) -> DeepseekV3Config:
    cfg = dict(
        _COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    cfg.update(overrides)
    return DeepseekV3Config(**cfg)


def qwen2_moe_config(**overrides) -> Qwen2MoeConfig:
    cfg = dict(
        _COMMON, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3, decoder_sparse_step=1,
        norm_topk_prob=False,
    )
    cfg.update(overrides)
    return Qwen2MoeConfig(**cfg)


def qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    cfg = dict(
        _COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=3, decoder_sparse_step=1, norm_topk_prob=True,
    )
    cfg.update(overrides)
    return Qwen3MoeConfig(**cfg)


def random_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A float32 model with random weights (large enough to make routing non-trivial)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
