"""`KTransformersExperts`: the routed experts of an MoE layer, computed by a registered backend.

It is called the way transformers 5 calls its experts module,
``experts(hidden_states, top_k_index, top_k_weights)``, so it can replace that module
inside an unmodified MoE block; kt's own MoE blocks also use `submit`/`sync` to overlap
the routed experts with the shared experts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.operators.dispatch import DispatchingModule
from kt_core.registry import OperatorKind
from kt_core.weights.source import WeightSource


class KTransformersExperts(DispatchingModule):
    """Replaces a transformers experts module (stacked ``gate_up_proj``/``down_proj``)."""

    backend_kind = OperatorKind.EXPERTS_BACKEND

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        out_device: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, generate_device, prefill_device, **kwargs)
        self.out_device = out_device
        self._pending_backend: nn.Module | None = None
        self._pending_out_device: torch.device | None = None

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        if not (hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")):
            return (
                "KTransformersExperts replaces a transformers experts module (with stacked "
                f"gate_up_proj and down_proj), not {type(module).__name__}; match '...mlp.experts'"
            )
        return None

    def _target(self, hidden_states: torch.Tensor) -> torch.device:
        return torch.device(self.out_device) if self.out_device is not None else hidden_states.device

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        self.submit(hidden_states, top_k_index, top_k_weights)
        return self.sync()

    def submit(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Start the experts for [T, H] tokens; the backend may run asynchronously."""
        backend = self.backend_for(hidden_states.shape[0])
        dev = backend.device
        self._pending_backend = backend
        self._pending_out_device = self._target(hidden_states)
        backend.submit(hidden_states.to(dev), top_k_index.to(dev), top_k_weights.to(dev))

    def sync(self) -> torch.Tensor:
        """Wait for the experts started by `submit` and return [T, H] on the output device."""
        if self._pending_backend is None or self._pending_out_device is None:
            raise RuntimeError(f"KTransformersExperts.sync() at {self.key} without a submit()")
        out = self._pending_backend.sync().to(self._pending_out_device)
        self._pending_backend = None
        return out
