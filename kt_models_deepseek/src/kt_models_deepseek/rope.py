"""`YarnRotaryEmbedding`: DeepSeek's rotary embedding, with its frequencies computed at load.

kt builds the model on ``meta``, where the rotary module's ``inv_freq`` is computed into
nothing, and ``inv_freq`` is a non-persistent buffer that no checkpoint stores. This
operator recomputes it in `load()`, on its own device, with transformers' own
functions for the config's rope type (``ROPE_INIT_FUNCTIONS`` for yarn, linear,
dynamic…, the module's ``compute_default_rope_parameters`` otherwise), so the
frequencies and the YaRN attention scaling are exactly transformers'.

Its forward returns what the replaced module returns: complex ``freqs_cis`` for
DeepSeek-V2, a ``(cos, sin)`` pair for DeepSeek-V3. Dynamic rope types keep working
through transformers' ``dynamic_rope_update``. The name is KTransformers'; the operator
serves every rope type, not only YaRN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from kt_core.injected import BaseInjectedModule
from kt_core.weights.source import WeightSource


def rope_type_of(config: PretrainedConfig) -> str:
    """The config's rope type (``"default"`` when it declares no scaling)."""
    params = getattr(config, "rope_parameters", None) or {}
    return str(params.get("rope_type", "default"))


class YarnRotaryEmbedding(BaseInjectedModule):
    """Replaces DeepseekV2RotaryEmbedding / DeepseekV3RotaryEmbedding; computes inv_freq at load."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, generate_device, prefill_device, **kwargs)
        if orig_module is None:
            raise TypeError(f"YarnRotaryEmbedding at {key} needs the rotary module it replaces")
        self.complex_output = isinstance(orig_module, DeepseekV2RotaryEmbedding)
        self.rope_type = rope_type_of(config)
        if self.rope_type != "default" and self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope type {self.rope_type!r} of the config is unknown to transformers "
                f"(known: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))})"
            )
        # Attributes transformers' dynamic_rope_update reads and updates.
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.attention_scaling = 1.0
        # Non-persistent buffers, None until load(); they shadow the original's meta ones. Set
        # directly: register_buffer refuses names the original already answers through
        # attribute fall-through.
        for name in ("inv_freq", "original_inv_freq"):
            self._buffers[name] = None
            self._non_persistent_buffers_set.add(name)

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        if not isinstance(module, (DeepseekV2RotaryEmbedding, DeepseekV3RotaryEmbedding)):
            return (
                "YarnRotaryEmbedding replaces DeepseekV2RotaryEmbedding or DeepseekV3RotaryEmbedding, "
                f"not {type(module).__name__}; match 'model.rotary_emb' of a DeepSeek model"
            )
        return None

    def load(self) -> None:
        """Compute inv_freq and the attention scaling for the config's rope type on this device."""
        if self.rope_type == "default":
            init_fn = type(self.orig_module).compute_default_rope_parameters
        else:
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, attention_scaling = init_fn(self.config, device=self.device)
        inv_freq = inv_freq.to(device=self.device, dtype=torch.float32)
        self.inv_freq = inv_freq
        self.original_inv_freq = inv_freq.clone()
        self.attention_scaling = float(attention_scaling)
        self.max_seq_len_cached = self.original_max_seq_len

    def unload(self) -> None:
        self.inv_freq = None
        self.original_inv_freq = None

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Position embeddings for `position_ids` [b, s], on `x`'s device (cos/sin in `x`'s dtype)."""
        if self.inv_freq is None:
            raise RuntimeError(f"YarnRotaryEmbedding at {self.key} used before load()")
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        freqs = position_ids.to(x.device)[..., None].float() * inv_freq
        if self.complex_output:
            return torch.polar(torch.ones_like(freqs), freqs) * self.attention_scaling
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)
