"""`KLinearTorch`: a linear layer as one ``torch.nn.functional.linear`` on a float weight."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from kt_core.backends import LinearBackend
from kt_core.cpu_matmul import matmul_weight
from kt_core.weights.source import WeightSource
from kt_ops_torch.dtypes import resolve_dtype


class KLinearTorch(LinearBackend):
    """Holds the weight dequantized to `dtype` on its device; computes in that dtype.

    Except for prefills on a CPU that has no dot products for a 16-bit `dtype`, where the
    call computes in float32 (`kt_core.cpu_matmul.matmul_weight`).
    """

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.dtype_name = dtype
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def load(self) -> None:
        self.weight, self.bias = self.load_weight(dtype=resolve_dtype(self.dtype_name))
        self.loaded = True

    def unload(self) -> None:
        self.weight = self.bias = None
        self.loaded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(f"KLinearTorch at {self.key} used before load()")
        # Rows as one 2-D matrix: for a 3-D input of one row ([1, 1, in]: a decode step, or
        # the last position of a prefill for the logits) torch 2.13's matmul takes a bmm
        # path that first copies the whole weight: 2.5 s per call for DeepSeek's bf16 lm_head.
        weight = matmul_weight(self.weight, x.numel() // x.shape[-1])
        rows = x.reshape(-1, x.shape[-1]).to(weight.dtype).contiguous()
        bias = None if self.bias is None else self.bias.to(weight.dtype)
        out = F.linear(rows, weight, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)
