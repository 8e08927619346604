"""The dummy plugin's operators. Importing this module is recorded, so tests can check laziness."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kt_core import BaseInjectedModule, LinearBackend

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
