"""`KDeepseekV2Model`: the DeepSeek decoder stack with layers split across devices.

It replaces transformers' ``DeepseekV2Model`` / ``DeepseekV3Model`` (rule ``^model$``) and
runs the same steps as their forward — embed, causal mask (transformers'
``create_causal_mask``), rotary position embeddings, the decoder layers, the final norm
— and returns the same ``MoeModelOutputWithPast``. What it adds is the
``transfer_map``: before each layer listed there, the hidden states and everything a
layer reads (position embeddings, mask, position ids) move to that layer's device, so
rules can put layers 0–29 on ``cuda:0`` and 30–59 on ``cuda:1``. The final norm runs
where the last layer left the hidden states. The layers' own caches live on their
layers' devices (transformers' caches allocate per layer on first use).

Its children (embedding, layers, norm, rotary) are the original's, so every other rule
still applies to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Model
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Model

from kt_core.injected import BaseInjectedModule
from kt_core.transfer import check_transfer_map, layer_devices, move_to
from kt_core.weights.source import WeightSource


class KDeepseekV2Model(BaseInjectedModule):
    """DeepSeek-V2/V3 decoder stack whose layers may live on several devices (``transfer_map``)."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        transfer_map: Mapping[int, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, generate_device, prefill_device, **kwargs)
        num_layers = config.num_hidden_layers
        self.transfer_map = check_transfer_map(transfer_map, num_layers, f"{type(self).__name__} at {key}")
        self.devices_by_layer = layer_devices(num_layers, self.transfer_map, self.generate_device)

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        if not isinstance(module, (DeepseekV2Model, DeepseekV3Model)):
            return (
                f"{cls.__name__} replaces DeepseekV2Model or DeepseekV3Model, not {type(module).__name__}; "
                "match '^model$' of a DeepSeek model"
            )
        return None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> MoeModelOutputWithPast:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # transformers' deprecated name
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", False))
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        device = torch.device(self.devices_by_layer[0] if self.devices_by_layer else self.generate_device)
        hidden_states = inputs_embeds.to(device)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(hidden_states.shape[1], device=device) + past).unsqueeze(0)
        position_ids = position_ids.to(device)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=move_to(attention_mask, device),
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        for index, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            target = torch.device(self.devices_by_layer[index])
            if target != device:
                device = target
                hidden_states = hidden_states.to(device)
                position_embeddings, mask, position_ids = move_to((position_embeddings, mask, position_ids), device)
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transfer_map={self.transfer_map}"


class KDeepseekV3Model(KDeepseekV2Model):
    """The same operator under the DeepSeek-V3 name: the V2 and V3 decoder stacks run identically."""
