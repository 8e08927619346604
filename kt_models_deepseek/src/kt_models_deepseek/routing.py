"""DeepSeek expert routing as pure functions of router logits.

kt's MoE blocks route tokens themselves (there is no separate gate operator), so the
routing math lives here, written to give the same experts and weights as transformers'
``DeepseekV2TopkRouter`` / ``DeepseekV3TopkRouter``: the same operations in the same
order, in float32. Keeping them free of modules makes them easy to test against the
transformers routers and to reuse from another MoE operator.
"""

from __future__ import annotations

import torch


def _group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """Boolean [T, E]: True for experts in each token's `topk_group` best groups."""
    num_group = group_scores.shape[-1]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, num_group, num_experts // num_group).reshape(-1, num_experts).bool()


def _check_groups(num_experts: int, n_group: int | None, topk_group: int | None) -> tuple[int, int]:
    if not n_group or not topk_group:
        raise ValueError(
            f"group-limited routing needs n_group and topk_group in the config, got {n_group}, {topk_group}"
        )
    if num_experts % n_group:
        raise ValueError(f"n_routed_experts ({num_experts}) is not a multiple of n_group ({n_group})")
    return n_group, topk_group


def route_softmax(
    logits: torch.Tensor,
    top_k: int,
    *,
    method: str = "greedy",
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 routing: softmax scores, top-k (optionally within the best groups).

    `logits` is [T, E] float32; returns (weights [T, K] float32, expert ids [T, K]).
    ``group_limited_greedy`` keeps only experts of the `topk_group` groups whose best
    expert scores highest (DeepSeek-V2's device-limited routing). Weights are not
    renormalized (transformers' V2 router does not), then scaled.
    """
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if method == "greedy":
        weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    elif method == "group_limited_greedy":
        num_experts = scores.shape[-1]
        n_group, topk_group = _check_groups(num_experts, n_group, topk_group)
        group_scores = scores.view(-1, n_group, num_experts // n_group).max(dim=-1).values
        scores = scores.masked_fill(~_group_mask(group_scores, topk_group, num_experts), 0.0)
        weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    else:
        raise ValueError(f"unknown DeepSeek-V2 topk_method {method!r}; expected 'greedy' or 'group_limited_greedy'")
    return weights * routed_scaling_factor, ids


def route_sigmoid(
    logits: torch.Tensor,
    top_k: int,
    *,
    correction_bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid scores, bias-corrected group-limited top-k.

    The correction bias only steers *which* experts are chosen (groups are ranked by the
    sum of their two best biased scores); the weights are the unbiased sigmoid scores of
    the chosen experts, optionally normalized to sum to one, then scaled.
    """
    num_experts = logits.shape[-1]
    n_group, topk_group = _check_groups(num_experts, n_group, topk_group)
    scores = logits.sigmoid()
    scores_for_choice = scores + correction_bias
    group_scores = scores_for_choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    mask = _group_mask(group_scores, topk_group, num_experts)
    scores_for_choice = scores_for_choice.masked_fill(~mask, float("-inf"))
    ids = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids
