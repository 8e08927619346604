"""The dummy plugin's operators. Importing this module is recorded, so tests can check laziness."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kt_core import BaseInjectedModule, ExpertsBackend, LinearBackend

IMPORTED = True


class DummyScaledModule(BaseInjectedModule):
    def __init__(self, key, gguf_loader, config, orig_module=None, generate_device="cpu", factor: float = 1.0, **kwargs):
        super().__init__(key, gguf_loader, config, orig_module, generate_device, **kwargs)
        self.factor = factor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        if isinstance(out, tuple):  # attention returns (output, weights)
            return (out[0] * self.factor, *out[1:])
        return out * self.factor


class KLinearDummyOffset(LinearBackend):
    def __init__(self, key, gguf_loader, config, orig_module, device="cpu", offset: float = 0.0, **kwargs):
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.offset = offset
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def load(self) -> None:
        self.weight, self.bias = self.load_weight(dtype=torch.float32)

    def unload(self) -> None:
        self.weight = self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.offset


class KExpertsDummyOffset(ExpertsBackend):
    """Routed experts the plain way (a loop over tokens and their top-k), plus a constant offset.

    The offset makes its output distinguishable from any other experts backend, so tests
    can tell which backend a wrapper dispatched a call to.
    """

    def __init__(self, key, gguf_loader, config, orig_module, device="cpu", offset: float = 0.0, **kwargs):
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.offset = offset
        self.weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def load(self) -> None:
        self.weights = self.load_expert_weights(dtype=torch.float32)

    def unload(self) -> None:
        self.weights = None

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        assert self.weights is not None, "load() first"
        gate, up, down = self.weights
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            x = hidden_states[t]
            for e, w in zip(topk_ids[t].tolist(), topk_weights[t], strict=True):
                out[t] += w * (down[e] @ (F.silu(gate[e] @ x) * (up[e] @ x)))
        return out + self.offset
