"""`KRMSNormCPUInfer`: transformers' RMSNorm as one call into the engine.

``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)`` is seven torch ops in transformers'
modules (two casts, pow, mean, add-rsqrt, two products). On one decode token each op's
dispatch costs far more than its 2048 values of arithmetic, and a DeepSeek-V2-Lite step has
82 norms (two per decoder layer, MLA's ``kv_a_layernorm``, the final norm): on the project's
Xeon VM a sampling profile put 8.8 % of the decode step in them. The engine computes the
same roundings in one pass on the calling thread (no pool job: the work is microseconds),
reading and writing the model's dtype directly (`kernels_norm.inc`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.injected import BaseInjectedModule
from kt_core.weights.source import WeightSource
from kt_ops_cpuinfer import _engine
from kt_ops_cpuinfer.dtypes import ENGINE_DTYPES
from kt_ops_cpuinfer.isa import current_isa
from kt_ops_cpuinfer.pool import require_cpu

# transformers classes whose forward is exactly the formula above (checked by name, since
# other RMSNorms differ: Gemma's multiplies by 1 + weight).
_SAME_FORMULA = frozenset({
    "DeepseekV2RMSNorm", "DeepseekV3RMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "Qwen2RMSNorm",
    "Qwen3RMSNorm", "MixtralRMSNorm", "LlamaRMSNorm",
})

class KRMSNormCPUInfer(BaseInjectedModule):
    """An RMSNorm (``weight`` [hidden], ``variance_epsilon``) computed by the C++ engine (devices: cpu)."""

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
        require_cpu("KRMSNormCPUInfer", key, self.device)
        problem = self.accepts(orig_module) if orig_module is not None else "no module to replace"
        if problem is not None:
            raise TypeError(f"KRMSNormCPUInfer at {key}: {problem}")
        assert orig_module is not None
        self.hidden_size = int(orig_module.weight.shape[0])
        self.eps = float(orig_module.variance_epsilon)
        self.weight_dtype = orig_module.weight.dtype  # the model's: the original multiplies by a weight of it
        self.isa: str | None = None
        # Directly, not via register_parameter: attribute fall-through makes the name look taken.
        self._parameters["weight"] = None

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        name = type(module).__name__
        if name not in _SAME_FORMULA:
            return (
                f"KRMSNormCPUInfer computes weight * (x * rsqrt(mean(x²) + eps)) as {', '.join(sorted(_SAME_FORMULA))} do; "
                f"{name} is not one of them"
            )
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not hasattr(module, "variance_epsilon"):
            return f"{name} has no 1-D weight and variance_epsilon"
        return None

    def load(self) -> None:
        if self.gguf_loader is None:
            raise RuntimeError(f"KRMSNormCPUInfer at {self.key} was created without a weight source")
        weight = self.gguf_loader.load(f"{self.key}.weight", dtype=self.weight_dtype, device="cpu")
        if tuple(weight.shape) != (self.hidden_size,):
            raise ValueError(
                f"{self.gguf_loader.description}: {self.key}.weight has shape {tuple(weight.shape)}, "
                f"expected ({self.hidden_size},)"
            )
        if weight.dtype not in ENGINE_DTYPES:
            raise ValueError(f"KRMSNormCPUInfer at {self.key}: the engine reads float32, bfloat16 or float16, not {weight.dtype}")
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.isa = current_isa()

    def unload(self) -> None:
        self.weight = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is None:
            raise RuntimeError(f"KRMSNormCPUInfer at {self.key} used before load()")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"KRMSNormCPUInfer at {self.key}: input has {hidden_states.shape[-1]} features, expected {self.hidden_size}"
            )
        if hidden_states.dtype not in ENGINE_DTYPES or hidden_states.device.type != "cpu":
            raise ValueError(
                f"KRMSNormCPUInfer at {self.key}: needs a float32, bfloat16 or float16 CPU input, "
                f"got {hidden_states.dtype} on {hidden_states.device}"
            )
        x = hidden_states.detach().contiguous()
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))
        _engine.rms_norm(self.isa, x.data_ptr(), ENGINE_DTYPES[x.dtype], x.numel() // self.hidden_size, self.hidden_size,
                         weight.data_ptr(), ENGINE_DTYPES[weight.dtype], self.eps, out.data_ptr(), ENGINE_DTYPES[out.dtype])
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.hidden_size}, eps={self.eps}, isa={self.isa or 'not loaded'}"
