"""`RMSNorm`: the transformers RMSNorm (T5 style), with its weight read at load.

Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, Llama and Mixtral all share one RMSNorm body:
normalize in float32, cast back to the input dtype, multiply by the weight. This operator
computes exactly that, so a model built on ``meta`` gets its norms from the weight source
like every other operator and the results equal the original's bit for bit. It also
runs on its own device and hands the result back on the caller's, so a norm can be
placed independently of its neighbours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.injected import BaseInjectedModule
from kt_core.weights.source import WeightSource


class RMSNorm(BaseInjectedModule):
    """Replaces a module with a 1-D ``weight`` and a ``variance_epsilon`` (transformers' RMSNorms)."""

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
            raise ValueError(f"RMSNorm at {key} needs the original norm to read its shape and epsilon")
        self.variance_epsilon = float(orig_module.variance_epsilon)
        self.hidden_size = int(orig_module.weight.shape[0])
        # The model's dtype: the original multiplies by a weight of this dtype.
        self.weight_dtype = orig_module.weight.dtype
        # Directly, not via register_parameter: attribute fall-through makes the name look taken.
        self._parameters["weight"] = None

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        params = dict(module.named_parameters(recurse=False))
        weight = params.get("weight")
        is_rms = (
            set(params) == {"weight"}
            and weight is not None
            and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float | int)
            and not any(True for _ in module.children())
        )
        if not is_rms:
            return (
                "RMSNorm replaces a transformers RMSNorm (one 1-D weight and a variance_epsilon, such as "
                f"Qwen2MoeRMSNorm or DeepseekV3RMSNorm), not {type(module).__name__}"
            )
        return None

    def load(self) -> None:
        if self.gguf_loader is None:
            raise RuntimeError(f"RMSNorm at {self.key} was created without a weight source")
        weight = self.gguf_loader.load(f"{self.key}.weight", dtype=self.weight_dtype, device=self.device)
        if tuple(weight.shape) != (self.hidden_size,):
            raise ValueError(
                f"{self.gguf_loader.description}: {self.key}.weight has shape {tuple(weight.shape)}, "
                f"expected ({self.hidden_size},)"
            )
        self.weight = nn.Parameter(weight, requires_grad=False)

    def unload(self) -> None:
        self.weight = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(f"RMSNorm at {self.key} used before load()")
        input_dtype, input_device = hidden_states.dtype, hidden_states.device
        h = hidden_states.to(device=self.weight.device, dtype=torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        out = self.weight * h.to(input_dtype)
        return out.to(device=input_device, dtype=input_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_size={self.hidden_size}, eps={self.variance_epsilon}"
