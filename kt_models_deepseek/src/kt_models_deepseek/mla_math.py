"""Multi-head latent attention (MLA) over the compressed cache, in two equivalent forms.

MLA caches per token only ``c_kv`` (the normalized latent, ``kv_lora_rank`` wide) and
``k_pe`` (the shared rotary key). ``kv_b_proj`` [H·(nope+v), kv_lora] maps the latent
to each head's key (``W_UK`` [H, nope, kv_lora]) and value (``W_UV`` [H, v, kv_lora]).

- *Absorbed*: ``q_nope·(W_UK c) = (q_nope W_UK)·c``, so queries move into latent space,
  attention runs directly on the cached latents, and ``W_UV`` is applied once to the
  latent context. Nothing per key is expanded: the right form for decode, where one
  query meets many keys.
- *Expanded*: keys and values are materialized per head from the latents, then
  ordinary attention runs. Cheaper when many queries share the keys (long prefill).

Both give the same result up to float summation order. Softmax runs in float32 like
transformers' eager attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature correction for a context stretched by `factor`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(config: PretrainedConfig) -> float:
    """``1/sqrt(qk_head_dim)``, times ``mscale(factor, mscale_all_dim)²`` under YaRN scaling.

    DeepSeek folds YaRN's temperature into the softmax scale (the same rule as
    transformers' ``yarn_apply_mscale``): with ``mscale_all_dim`` set and a non-default
    rope type, scores are scaled by the squared mscale.
    """
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params: Mapping[str, Any] = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = yarn_mscale(params["factor"], mscale_all_dim)
            scale = scale * mscale * mscale
    return scale


def split_kv_b(
    weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj.weight`` → (W_UK [H, nope, kv_lora], W_UV [H, v, kv_lora]), views of `weight`."""
    per_head = weight.view(num_heads, qk_nope_head_dim + v_head_dim, weight.shape[-1])
    return per_head[:, :qk_nope_head_dim], per_head[:, qk_nope_head_dim:]


HeadProjection = Callable[[torch.Tensor], torch.Tensor]
"""A per-head linear map on [b, H, s, d_in] → [b, H, s, d_out] (each head its own matrix)."""


def matmul_projection(weight: torch.Tensor) -> HeadProjection:
    """The per-head product with `weight` [H, d_in, d_out] by torch's batched matmul."""
    return lambda x: torch.matmul(x, weight)


def _probabilities(scores: torch.Tensor, scale: float, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    logits = (scores * scale).float().masked_fill(~visible, torch.finfo(torch.float32).min)
    return logits.softmax(dim=-1).to(dtype)


def absorbed_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    to_latent: HeadProjection,
    from_latent: HeadProjection,
    scale: float,
    visible: torch.Tensor,
) -> torch.Tensor:
    """Per-head context [b, H, s, v] computed in latent space.

    Shapes: `q_nope` [b, H, s, nope], `q_pe` [b, H, s, rope], `c_kv` [b, 1, T, kv_lora],
    `k_pe` [b, 1, T, rope], `visible` bool [b, 1, s, T] (True where a query sees a key).
    `to_latent` is the product with W_UK (nope → kv_lora per head), `from_latent` the one
    with W_UV transposed (kv_lora → v); `matmul_projection` makes them from float weights,
    a per-head backend computes them on stored blocks.
    """
    b, heads, s, _ = q_nope.shape
    keys = c_kv.shape[-2]
    q_latent = to_latent(q_nope).to(c_kv.dtype)  # [b, H, s, kv_lora]
    # Every head attends to the same single latent "head", so heads fold into query rows and
    # each product is one [H*s, d] x [d, T] matrix per batch: a broadcast 4-D matmul against
    # the transposed cache takes a slow generic path in bfloat16 on the CPU (~20x slower).
    scores = torch.bmm(_rows(q_latent), c_kv[:, 0].transpose(1, 2)) + torch.bmm(_rows(q_pe), k_pe[:, 0].transpose(1, 2))
    probs = _probabilities(scores.view(b, heads, s, keys), scale, visible, c_kv.dtype)
    context_latent = torch.bmm(_rows(probs), c_kv[:, 0]).view(b, heads, s, -1)  # [b, H, s, kv_lora]
    return from_latent(context_latent)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[b, H, s, d] as [b, H*s, d]: all heads' queries as rows of one matrix per batch."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


def expanded_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    scale: float,
    visible: torch.Tensor,
) -> torch.Tensor:
    """The same context as `absorbed_attention`, with keys and values expanded per head.

    The attention itself is torch's fused `scaled_dot_product_attention`, which on the CPU
    is a blocked flash kernel with a float32 softmax. Written out as matmuls, a long
    prompt's scores and probabilities are several [b, H, s, T] float32 tensors per layer
    (256 MB each for DeepSeek-V2-Lite's 16 heads at 2048 tokens), every pass over them
    bound by memory. The kernel keeps them in cache-sized blocks and, for a plain causal
    mask, skips the hidden ones: 0.12 s per layer at 2048 tokens on the 2-core VMs, against
    0.68 s for the matmuls and 0.40 s for torch's unfused fallback. That kernel needs one
    head size for queries, keys and values, so the shorter side is padded with zeros
    (which add nothing to the scores, and whose output columns are dropped).

    The mask is additive (0 where visible, the dtype's lowest value elsewhere), not boolean,
    so a query that sees no key gets the uniform average of the values, as in
    `absorbed_attention`'s masked softmax, not zeros.
    """
    heads, s = q_nope.shape[1], q_nope.shape[2]
    v_dim, keys_count = w_uv.shape[1], c_kv.shape[-2]
    k_nope = torch.matmul(c_kv, w_uk.transpose(-1, -2))  # [b, H, T, nope]
    values = torch.matmul(c_kv, w_uv.transpose(-1, -2))  # [b, H, T, v]
    keys = torch.cat([k_nope, k_pe.expand(-1, heads, -1, -1)], dim=-1)  # [b, H, T, nope + rope]
    queries = torch.cat([q_nope, q_pe], dim=-1)
    width = max(queries.shape[-1], v_dim)
    queries, keys = F.pad(queries, (0, width - queries.shape[-1])), F.pad(keys, (0, width - keys.shape[-1]))
    values = F.pad(values, (0, width - v_dim))
    if s == keys_count and torch.equal(visible, _causal(s, visible.device).expand_as(visible)):
        context = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale)
    else:
        hidden = torch.zeros(visible.shape, dtype=queries.dtype, device=queries.device)
        hidden.masked_fill_(~visible, torch.finfo(queries.dtype).min)
        context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=hidden, scale=scale)
    return context[..., :v_dim]


def _causal(size: int, device: torch.device) -> torch.Tensor:
    """Boolean [size, size]: query i sees keys 0..i (torch's ``is_causal``, aligned at key 0)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()
