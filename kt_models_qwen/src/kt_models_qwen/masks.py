"""Attention masks per layer type, built the way the transformers Qwen MoE models build them.

Qwen2-MoE names each layer's attention kind in ``config.layer_types`` (full or sliding
window); Qwen3-MoE has no ``layer_types`` and uses a sliding-window mask for every layer
exactly when ``config.sliding_window`` is set. The model operator builds one mask per
kind that occurs, once per forward, with transformers' own mask functions (so every
attention implementation — eager, sdpa, flex — gets the mask form it expects).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

FULL = "full_attention"
SLIDING = "sliding_attention"

_MASK_FUNCTIONS: dict[str, Callable[..., Any]] = {
    FULL: create_causal_mask,
    SLIDING: create_sliding_window_causal_mask,
}


def layer_attention_types(config: PretrainedConfig) -> list[str]:
    """The attention kind (``full_attention``/``sliding_attention``) of each decoder layer."""
    num_layers = int(config.num_hidden_layers)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(layer_types)[:num_layers]
    kind = SLIDING if getattr(config, "sliding_window", None) else FULL
    return [kind] * num_layers


def build_masks(
    config: PretrainedConfig,
    kinds: set[str],
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | dict[str, Any] | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
) -> dict[str, Any]:
    """Mask by attention kind for the kinds in `kinds`.

    A dict `attention_mask` was prepared by the caller (``generate`` does that) and is
    used as it is.
    """
    if isinstance(attention_mask, dict):
        return attention_mask
    unknown = kinds - _MASK_FUNCTIONS.keys()
    if unknown:
        raise ValueError(f"unsupported attention layer types {sorted(unknown)}; expected {sorted(_MASK_FUNCTIONS)}")
    return {
        kind: _MASK_FUNCTIONS[kind](
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        for kind in sorted(kinds)
    }


def move_mask(mask: Any, device: torch.device | str) -> Any:
    """`mask` on `device`: a tensor, a flex-attention ``BlockMask`` (has ``.to``), or None."""
    if mask is None:
        return None
    return mask.to(device)
