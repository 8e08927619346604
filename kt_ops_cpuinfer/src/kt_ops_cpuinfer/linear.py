"""`KLinearCPUInfer`: a linear layer on the native CPU engine, on the stored GGUF blocks.

For dense projections placed on the CPU (shared experts, dense MLPs, lm_head): the weight
is used as stored (memory-mapped, quantized), the input rows are quantized per block like
the experts' and the rows of W are split over the engine's pool. Synchronous, like every
linear backend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.backends import BackendMemory, LinearBackend
from kt_core.weights.source import WeightSource
from kt_ops_cpuinfer import _engine
from kt_ops_cpuinfer.dtypes import ENGINE_DTYPES, engine_rows
from kt_ops_cpuinfer.isa import current_isa
from kt_ops_cpuinfer.pool import get_pool, require_cpu, scratch_memory
from kt_ops_cpuinfer.weights import EngineMatrix, read_matrix, storage_problem


class KLinearCPUInfer(LinearBackend):
    """``y = x W^T + b`` by the C++ engine (devices: cpu); `threads` sizes the shared pool,
    `backend` is accepted for KTransformers rule files and has no effect."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        threads: int | None = None,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        require_cpu("KLinearCPUInfer", key, self.device)
        self.threads = threads
        self.compat_backend = backend
        self.isa: str | None = None
        self.repacked_bytes = 0
        self._op: Any = None
        self._weight: EngineMatrix | None = None
        self.bias: torch.Tensor | None = None

    def check_weights(self) -> list[str]:
        problem = storage_problem(self._source(), f"{self.key}.weight", "KLinearCPUInfer")
        return [problem] if problem else []

    def load(self) -> None:
        source = self._source()
        weight = read_matrix(source, f"{self.key}.weight", (self.out_features, self.in_features), "KLinearCPUInfer")
        bias = None
        if self.has_bias:
            bias = source.load(f"{self.key}.bias", dtype=torch.float32).contiguous()
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(
                    f"{source.description}: {self.key}.bias has shape {tuple(bias.shape)}, expected ({self.out_features},)"
                )
        self.isa = current_isa()
        self._op = _engine.Linear(get_pool(self.threads), self.isa, weight.spec())
        self._weight = weight
        self.bias = bias
        self.repacked_bytes = weight.repacked_bytes
        self.loaded = True

    def unload(self) -> None:
        self._op = None
        self._weight = None
        self.bias = None
        self.repacked_bytes = 0
        self.loaded = False

    def memory(self) -> BackendMemory:
        """Weight bytes used in place from the file's memory map, and copies made at load."""
        if self._weight is None:
            return BackendMemory()
        return BackendMemory(
            mapped=self._weight.mapped_bytes, repacked=self.repacked_bytes, shared=scratch_memory(get_pool(self.threads))
        )

    @property
    def weight_type(self) -> str | None:
        """GGML type the engine computes on (after `load`)."""
        return self._weight.ggml_type if self._weight is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._op is None:
            raise RuntimeError(f"KLinearCPUInfer at {self.key} used before load()")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KLinearCPUInfer at {self.key}: input has {x.shape[-1]} features, expected {self.in_features}")
        rows = engine_rows(x, self.in_features)  # the model's dtype: the engine widens and rounds itself
        out = torch.empty(rows.shape[0], self.out_features, dtype=rows.dtype)
        bias_ptr = self.bias.data_ptr() if self.bias is not None else 0
        kind = ENGINE_DTYPES[rows.dtype]
        self._op.forward(rows.data_ptr(), rows.shape[0], out.data_ptr(), bias_ptr, kind, kind)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, isa={self.isa or 'not loaded'}, weight={self.weight_type}"
