"""`KLinearMarlin`: a linear layer held as symmetric int4 with group scales.

At load the weight is read as float32 from any source (GGUF of any type, safetensors),
quantized on the backend's device and laid out for that device's kernel; the float copy
is dropped. Decode reads a quarter of the bytes of a bf16 weight. On ``cuda`` the
Triton kernel computes; on ``cpu`` (a rule file's placement, or ``--device-map``) torch's
CPU int4 matmul computes on the same int4 values, so results match a GPU run up to
summation order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.backends import LinearBackend
from kt_core.weights.source import WeightSource
from kt_ops_marlin.device_paths import Int4Matmul, path_note, path_problem, prepare_int4
from kt_ops_marlin.group_size import shape_problem, validate_group_size


def compute_dtype(name: str | None) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``; None → torch's current default dtype (the model's, at load)."""
    return torch.get_default_dtype() if name is None else getattr(torch, name)


class KLinearMarlin(LinearBackend):
    """``y = x @ (q·s)ᵀ + b`` with int4 ``q`` and per-group scales ``s``, on cuda or cpu."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        group_size: int = 128,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.group_size = validate_group_size(group_size)
        self.dtype_name = dtype
        self.int4: Int4Matmul | None = None
        self.bias: torch.Tensor | None = None

    @classmethod
    def compute_path(cls, device: torch.device | str) -> str:
        """How this backend computes on `device`, e.g. ``"int4, CPU path: …"`` (what explain shows)."""
        return path_note(device)

    def check_weights(self) -> list[str]:
        problems = [shape_problem(f"{self.key}.weight", self.in_features, self.group_size)]
        path = path_problem(self.device)
        problems.append(None if path is None else f"{self.key}: KLinearMarlin on {self.device}: {path}")
        return [p for p in problems if p is not None]

    def load(self) -> None:
        problem = shape_problem(f"{self.key}.weight", self.in_features, self.group_size)
        if problem is not None:
            raise ValueError(problem)
        dtype = compute_dtype(self.dtype_name)
        weight, bias = self.load_weight(dtype=torch.float32)
        self.int4 = prepare_int4(weight, self.group_size, dtype, self.device)
        del weight
        self.bias = None if bias is None else bias.to(dtype)
        self.loaded = True

    def unload(self) -> None:
        self.int4 = None
        self.bias = None
        self.loaded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is None:
            raise RuntimeError(f"KLinearMarlin at {self.key} used before load()")
        out = self.int4(x)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"device={self.device}, path={self.compute_path(self.device)!r}"
        )
