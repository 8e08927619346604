"""`KQwen2MoeModel` / `KQwen3MoeModel`: the Qwen MoE decoder stack with layers spread over devices.

The forward is the transformers model's (embeddings, causal masks, rotary embedding,
decoder layers, final norm, `MoeModelOutputWithPast`), plus the ``transfer_map`` of
KTransformers: at each layer index it names, hidden states, position embeddings, masks
and position ids move to that device, so ``{24: "cuda:1"}`` on an operator placed on
``cuda:0`` runs layers 0–23 on one GPU and the rest on another. Layers before the first
entry run on the operator's own device (its ``generate_device``), where the embeddings'
output is moved first — the same convention as ``KDeepseekV2Model``. The final norm
runs where the last layer left the hidden states. The embeddings, rotary embedding,
layers and norm are the adopted children, called as modules, so rules replace them.

Output capture differs from transformers' hook-based one: hidden states are collected
here (same tuple as transformers gives); attentions and router logits are not recorded
(routing runs inside kt's MoE operators) and asking for them is an error rather than a
silently missing value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeModelOutputWithPast

from kt_core.injected import BaseInjectedModule
from kt_core.transfer import check_transfer_map, layer_devices, move_to
from kt_core.weights.source import WeightSource
from kt_models_qwen.masks import build_masks, layer_attention_types, move_mask

_UNRECORDED_OUTPUTS = ("output_attentions", "output_router_logits")


class KQwen2MoeModel(BaseInjectedModule):
    """Replaces ``Qwen2MoeModel`` or ``Qwen3MoeModel`` (``^model$``); kwargs: ``transfer_map``.

    Both names accept both models: the two transformers models differ only in how they
    choose masks, which `layer_attention_types` reads from the config, so a Qwen3-MoE
    rule file may use either name.
    """

    replaces = ("Qwen2MoeModel", "Qwen3MoeModel")

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        transfer_map: dict[int, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, generate_device, prefill_device, **kwargs)
        self.num_layers = int(config.num_hidden_layers)
        self.transfer_map = check_transfer_map(transfer_map, self.num_layers, f"{type(self).__name__} at {key}")
        self.layer_types = layer_attention_types(config)
        # Layers before the first transfer_map entry run on this operator's own device.
        self.devices_by_layer = layer_devices(self.num_layers, self.transfer_map, self.generate_device)

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        if not any(base.__name__ in cls.replaces for base in type(module).__mro__):
            return (
                f"{cls.__name__} replaces the decoder stack {' or '.join(cls.replaces)} "
                f"(match '^model$'), not {type(module).__name__}"
            )
        return None

    def load(self) -> None:
        """Nothing of its own to read: the embeddings, layers and norm are loaded as modules."""

    def unload(self) -> None:
        """Nothing of its own to release."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict[str, Any] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> MoeModelOutputWithPast | tuple[Any, ...]:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = _take_legacy_cache(cache, kwargs)
        return_dict = kwargs.pop("return_dict", getattr(self.config, "return_dict", True))
        output_hidden_states = _pop_output_flags(self.config, kwargs)
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", False)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        device = torch.device(self.devices_by_layer[0] if self.devices_by_layer else self.generate_device)
        hidden_states = inputs_embeds.to(device)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(hidden_states.shape[1], device=device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        position_ids = position_ids.to(device)
        if isinstance(attention_mask, dict):
            attention_mask = {kind: move_mask(mask, device) for kind, mask in attention_mask.items()}
        else:
            attention_mask = move_mask(attention_mask, device)

        masks = build_masks(self.config, set(self.layer_types), hidden_states, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        all_hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        for index, decoder_layer in enumerate(self.layers[: self.num_layers]):
            target = torch.device(self.devices_by_layer[index])
            if target != device:
                device = target
                hidden_states = hidden_states.to(device)
                position_embeddings = move_to(position_embeddings, device)
                position_ids = position_ids.to(device)
                masks = {kind: move_mask(mask, device) for kind, mask in masks.items()}
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=masks[self.layer_types[index]],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)  # transformers ties the last one to the normed output
        output = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )
        return output if return_dict else output.to_tuple()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transfer_map={self.transfer_map}"


class KQwen3MoeModel(KQwen2MoeModel):
    """`KQwen2MoeModel` under the Qwen3 name, for rule files that say what they run."""


def _take_legacy_cache(cache: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """Accept transformers' older ``past_key_values`` name for ``cache`` (as its models still do)."""
    legacy = kwargs.pop("past_key_values", None)
    if legacy is None:
        return cache
    if cache is not None:
        raise ValueError("pass either cache or past_key_values, not both")
    return legacy


def _pop_output_flags(config: PretrainedConfig, kwargs: dict[str, Any]) -> bool:
    """Remove the ``output_*`` flags from `kwargs`; whether hidden states are wanted.

    Raises for outputs this model does not record, instead of returning None for them.
    """
    for flag in _UNRECORDED_OUTPUTS:
        requested = kwargs.pop(flag, None)
        if requested is None:
            requested = getattr(config, flag, False)
        if requested:
            raise ValueError(
                f"{flag}=True is not supported by kt's Qwen model operator: attentions and router "
                "logits are not recorded; run without it"
            )
    wanted = kwargs.pop("output_hidden_states", None)
    if wanted is None:
        wanted = bool(getattr(config, "output_hidden_states", False))
    if not isinstance(wanted, bool):
        raise ValueError(f"output_hidden_states must be True or False here, got {wanted!r}")
    return wanted
