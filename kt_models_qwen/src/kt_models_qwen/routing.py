"""Qwen MoE routing: softmax over all experts, keep the top k, optionally renormalize.

It is the arithmetic of transformers' ``Qwen2MoeTopKRouter`` / ``Qwen3MoeTopKRouter``,
done in float32 whatever the model's dtype: the router is tiny (experts × hidden), and
near-ties between experts are common enough that bf16 logits can flip a token's choice
of expert. On a float32 model the result is identical to transformers'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_topk_route(
    hidden_states: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] (int64) and float32 weights [T, k] for tokens `hidden_states` [T, H].

    `router_weight` is [E, H] in float32; tokens are moved to its device.
    """
    logits = F.linear(hidden_states.to(device=router_weight.device, dtype=torch.float32), router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_weights, top_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return top_ids, top_weights
