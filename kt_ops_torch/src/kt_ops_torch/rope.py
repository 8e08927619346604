"""`RotaryEmbedding`: a transformers rotary embedding whose tables are computed at load.

kt builds the model on the ``meta`` device, so the original module's ``inv_freq`` buffer
is a shape without values (computing it at build time would need real memory and a
device). This operator computes ``inv_freq`` and ``attention_scaling`` in `load()`, on
its own device, with the same transformers function the original used for the config's
``rope_type`` (the module's ``compute_default_rope_parameters`` for ``default``,
``ROPE_INIT_FUNCTIONS`` otherwise). Its forward is the original's, so the ``(cos, sin)``
it returns are bit-identical; ``dynamic`` and ``longrope`` types keep transformers'
per-call frequency update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from kt_core.injected import BaseInjectedModule
from kt_core.weights.source import WeightSource

RopeInit = Callable[..., tuple[torch.Tensor, float]]


def _rope_init_function(module: nn.Module, rope_type: str) -> RopeInit | None:
    """The function transformers uses to compute `module`'s frequencies, or None if unknown."""
    if rope_type == "default":
        return getattr(type(module), "compute_default_rope_parameters", None)
    return ROPE_INIT_FUNCTIONS.get(rope_type)


def _returns_cos_sin(module: nn.Module) -> str | None:
    """Why `module`'s forward is not of the ``(cos, sin)`` kind, or None if it is.

    Runs the undecorated forward on ``meta`` inputs (no memory, no arithmetic): it tells
    apart modules that return e.g. complex ``freqs_cis`` (DeepSeek-V2) without a list of
    class names. The dynamic-update decorator is skipped because it needs real values.
    """
    forward = type(module).forward
    forward = getattr(forward, "__wrapped__", forward)
    x = torch.empty(1, 2, 1, device="meta")
    position_ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
    try:
        out = forward(module, x, position_ids)
    except Exception as exc:  # an unexpected signature or body: not a module we can mirror
        return f"its forward(x, position_ids) could not be traced ({type(exc).__name__}: {exc})"
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        return f"its forward returns {type(out).__name__}, not a (cos, sin) pair of tensors"
    if any(t.is_complex() for t in out):
        return "its forward returns complex tensors, not (cos, sin)"
    return None


class RotaryEmbedding(BaseInjectedModule):
    """Replaces a transformers ``*RotaryEmbedding`` that returns ``(cos, sin)`` in the input dtype."""

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
            raise ValueError(f"RotaryEmbedding at {key} needs the original rotary module to read its rope_type")
        self.rope_type: str = orig_module.rope_type
        # The original's config: transformers computes the frequencies from it, not from ours.
        self.rope_config: PretrainedConfig = getattr(orig_module, "config", config)
        init_fn = _rope_init_function(orig_module, self.rope_type)
        if init_fn is None:
            raise ValueError(f"RotaryEmbedding at {key}: no transformers function computes rope_type {self.rope_type!r}")
        self.rope_init_fn: RopeInit = init_fn
        self.max_seq_len_cached = getattr(orig_module, "max_seq_len_cached", None)
        self.original_max_seq_len = getattr(orig_module, "original_max_seq_len", None)
        self.attention_scaling: float = 1.0
        # Directly, not via register_buffer: attribute fall-through makes the names look taken.
        for name in ("inv_freq", "original_inv_freq"):
            self._buffers[name] = None
            self._non_persistent_buffers_set.add(name)

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        name = type(module).__name__
        rope_type = getattr(module, "rope_type", None)
        if not isinstance(rope_type, str) or not isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return (
                "RotaryEmbedding replaces a transformers rotary embedding with one rope_type and an "
                f"inv_freq buffer (such as Qwen2MoeRotaryEmbedding), not {name}"
            )
        if _rope_init_function(module, rope_type) is None:
            return f"RotaryEmbedding cannot compute rope_type {rope_type!r} of {name}; transformers has no function for it"
        reason = _returns_cos_sin(module)
        if reason is not None:
            return f"RotaryEmbedding produces (cos, sin); {name} is of another kind: {reason}"
        return None

    def load(self) -> None:
        inv_freq, attention_scaling = self.rope_init_fn(self.rope_config, device=self.device)
        inv_freq = inv_freq.to(self.device)
        self.inv_freq = inv_freq
        self.original_inv_freq = inv_freq.clone()
        self.attention_scaling = attention_scaling
        # What transformers' constructor sets; the dynamic update reads and resets them.
        self.max_seq_len_cached = self.original_max_seq_len

    def unload(self) -> None:
        self.inv_freq = None
        self.original_inv_freq = None

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq is None:
            raise RuntimeError(f"RotaryEmbedding at {self.key} used before load()")
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rope_type={self.rope_type!r}"
