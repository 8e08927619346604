"""`KExpertsCPU`: a layer's routed experts on the native CPU engine, asynchronously.

The expert weights stay as stored in the GGUF file (memory-mapped, quantized); the engine
quantizes activations per block, groups the batch's (token, expert) pairs by expert and
runs gate+up (fused, with the config's activation), down and the weighted sum on its
thread pool. `submit` queues that work and returns at once, so kt's MoE blocks compute
the shared experts while the routed ones run; `sync` waits (without holding the GIL)
and returns the result in the caller's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.backends import BackendMemory, ExpertsBackend
from kt_core.weights.source import WeightSource
from kt_ops_cpuinfer import _engine
from kt_ops_cpuinfer.activation import activation_name
from kt_ops_cpuinfer.dtypes import engine_rows
from kt_ops_cpuinfer.isa import current_isa
from kt_ops_cpuinfer.moe_job import MoEJob
from kt_ops_cpuinfer.pool import get_pool, require_cpu, scratch_memory
from kt_ops_cpuinfer.weights import EngineMatrix, read_matrix, row_slice, storage_problem


class KExpertsCPU(ExpertsBackend):
    """Routed experts computed by the C++ engine on the stored GGUF blocks (devices: cpu).

    `threads` sizes the shared worker pool (physical cores by default); `backend` is accepted
    for KTransformers rule files and has no effect. After `load`, `repacked_bytes` is the
    memory held beyond the file's memory map (zero for GGUF experts) and `isa` the kernel
    path in use.
    """

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
        require_cpu("KExpertsCPU", key, self.device)
        self.threads = threads
        self.compat_backend = backend
        self.act = activation_name(config)
        self.isa: str | None = None
        self.repacked_bytes = 0
        self._layer: Any = None
        self._matrices: tuple[EngineMatrix, ...] = ()
        self._job = MoEJob("KExpertsCPU", key)
        self._result_dtype: torch.dtype | None = None

    # -- weights -------------------------------------------------------------------------

    def _weight_names(self, source: WeightSource) -> list[str]:
        if source.has(f"{self.key}.gate_proj"):
            return [f"{self.key}.gate_proj", f"{self.key}.up_proj", f"{self.key}.down_proj"]
        return [f"{self.key}.gate_up_proj", f"{self.key}.down_proj"]

    def check_weights(self) -> list[str]:
        source = self._source()
        return [p for name in self._weight_names(source) if (p := storage_problem(source, name, "KExpertsCPU"))]

    def load(self) -> None:
        source = self._source()
        E, inter, H = self.num_experts, self.intermediate_size, self.hidden_size
        if source.has(f"{self.key}.gate_proj"):
            gate = read_matrix(source, f"{self.key}.gate_proj", (E, inter, H), "KExpertsCPU")
            up = read_matrix(source, f"{self.key}.up_proj", (E, inter, H), "KExpertsCPU")
        else:
            fused = read_matrix(source, f"{self.key}.gate_up_proj", (E, 2 * inter, H), "KExpertsCPU")
            gate, up = row_slice(fused, 0, inter), row_slice(fused, inter, inter)
        down = read_matrix(source, f"{self.key}.down_proj", (E, H, inter), "KExpertsCPU")
        self.isa = current_isa()
        self._layer = _engine.MoELayer(
            get_pool(self.threads), self.isa, E, H, inter, gate.spec(), up.spec(), down.spec(), self.act
        )
        self._matrices = (gate, up, down)
        self.repacked_bytes = sum(m.repacked_bytes for m in self._matrices)
        self.loaded = True

    def unload(self) -> None:
        if self._job.pending:
            self.sync()
        self._layer = None
        self._matrices = ()
        self.repacked_bytes = 0
        self.loaded = False

    def memory(self) -> BackendMemory:
        """Expert bytes used in place from the file's memory map, copies made at load, the pool's buffers."""
        if self._layer is None:
            return BackendMemory()
        return BackendMemory(
            mapped=sum(m.mapped_bytes for m in self._matrices), repacked=self.repacked_bytes,
            shared=scratch_memory(get_pool(self.threads)),
        )

    @property
    def weight_types(self) -> dict[str, str]:
        """GGML type of each matrix the engine computes on (after `load`)."""
        return {m.name.rsplit(".", 1)[-1]: m.ggml_type for m in self._matrices}

    # -- compute -------------------------------------------------------------------------

    def submit(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Queue the experts for `hidden_states` [T, H]; returns before they are computed."""
        if self._layer is None:
            raise RuntimeError(f"KExpertsCPU at {self.key} used before load()")
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise ValueError(
                f"KExpertsCPU at {self.key}: hidden states must be [tokens, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"KExpertsCPU at {self.key}: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                f"{tuple(topk_weights.shape)} must both be [tokens, k] for {hidden_states.shape[0]} tokens"
            )
        x = engine_rows(hidden_states, self.hidden_size)  # the model's dtype: the engine widens and rounds itself
        ids = topk_ids.detach().to(device="cpu", dtype=torch.int64).contiguous()
        weights = topk_weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self._job.start(self._layer, x, ids, weights)
        self._result_dtype = hidden_states.dtype

    def done(self) -> bool:
        """Whether the last `submit` has finished computing (True when nothing is pending)."""
        return self._layer is None or bool(self._layer.done)

    def sync(self) -> torch.Tensor:
        """Wait for the last `submit` and return [T, H] in the submitted hidden states' dtype."""
        out = self._job.wait()
        return out if out.dtype == self._result_dtype else out.to(self._result_dtype)

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.submit(hidden_states, topk_ids, topk_weights)
        return self.sync()

    def extra_repr(self) -> str:
        return f"threads={self.threads or 'physical cores'}, isa={self.isa or 'not loaded'}, act={self.act}"
