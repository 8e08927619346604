"""The demo model: DeepSeek-V2-Lite's architecture, scaled down, with seeded random weights.

Everything is deterministic (config, tokenizer, weights), so the GGUF file written to
the cache is the same on every machine and can be reused between runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import DeepseekV2Config, PreTrainedTokenizerBase

from kt_core.weights.source import StateDictSource

DEMO_VERSION = 1
"""Bump when the demo model changes, so stale cached files are rebuilt."""


def demo_config(tokenizer: PreTrainedTokenizerBase) -> DeepseekV2Config:
    """DeepSeek-V2-Lite's layout (MLA without q_lora, a dense first layer, 2 shared experts)."""
    return DeepseekV2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=2048,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


def demo_weights(config: DeepseekV2Config, seed: int = 0) -> StateDictSource:
    """Seeded random weights for every tensor of the model (norms near 1, the rest small)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in meta.state_dict().items():
        if "norm" in name:
            tensors[name] = 1.0 + 0.05 * torch.randn(tensor.shape, generator=generator)
        else:
            tensors[name] = 0.06 * torch.randn(tensor.shape, generator=generator)
    return StateDictSource(tensors, description="demo weights")


def cache_dir() -> Path:
    """Where the demo GGUF is kept (``$KT_CACHE``, else ``$XDG_CACHE_HOME/kt``, else ``~/.cache/kt``)."""
    if os.environ.get("KT_CACHE"):
        return Path(os.environ["KT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kt"
