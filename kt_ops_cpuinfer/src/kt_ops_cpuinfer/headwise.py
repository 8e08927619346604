"""`KHeadwiseLinearCPUInfer`: per-head products on the native CPU engine, on the stored blocks.

For MLA's absorbed attention on the CPU: each head's query into latent space and each
head's latent context back out. A current DeepSeek GGUF stores both halves per head
(``attn_k_b``, ``attn_v_b``), so the engine reads them as stored — quantized, memory-mapped
— in one call over all heads, instead of torch's batched matmuls on float32 copies four
to eight times their size. A source without those tensors (a fused ``kv_b_proj``, a
safetensors checkpoint) gets a float32 copy built by the operator's fallback, counted in
``repacked_bytes``.

Between its two products the backend also runs the attention core itself
(`latent_attention`: scores against the cached latents, softmax, weighted sum) as one
engine job that reads the cache in its stored dtype, so the absorbed form is three
engine calls per layer with no torch op or float32 cache copy between them. When the
layer's other parts are engine ops too, `fused_absorbed_attention` runs the whole step,
projections and cache write included, as one job (`absorbed_mla`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.absorbed_attention import AbsorbedAttentionParts, FusedAbsorbedAttention
from kt_core.backends import BackendMemory, HeadwiseLinearBackend
from kt_core.weights.source import WeightSource
from kt_ops_cpuinfer import _engine
from kt_ops_cpuinfer.absorbed_mla import EngineAbsorbedAttention
from kt_ops_cpuinfer.dtypes import ENGINE_DTYPES, engine_rows
from kt_ops_cpuinfer.isa import current_isa
from kt_ops_cpuinfer.pool import get_pool, require_cpu, scratch_memory
from kt_ops_cpuinfer.weights import EngineMatrix, float32_matrix, read_matrix, storage_problem

_CACHE_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class KHeadwiseLinearCPUInfer(HeadwiseLinearBackend):
    """``y[..., h, :] = W[h] @ x[..., h, :]`` by the C++ engine (devices: cpu); `threads` sizes
    the shared pool, `backend` is accepted like the engine's other operators and has no effect."""

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
        require_cpu("KHeadwiseLinearCPUInfer", key, self.device)
        self.threads = threads
        self.compat_backend = backend
        self.isa: str | None = None
        self._op: Any = None
        self._attention: Any = None
        self._weight: EngineMatrix | None = None

    def check_weights(self) -> list[str]:
        if not self.stored():
            return []  # the fallback's float32 copy is always computable
        problem = storage_problem(
            self._source(), self.key, "KHeadwiseLinearCPUInfer",
            "no absorb_op in the attention's rule (torch's matmuls on dequantized halves)",
        )
        return [problem] if problem else []

    def load(self) -> None:
        if self.stored():
            weight = read_matrix(self._source(), self.key, self.shape, "KHeadwiseLinearCPUInfer")
        else:  # the fallback's weight, as a float32 copy counted as repacked memory
            weight = float32_matrix(self.key, self.load_weight(torch.float32), self.shape, self._source().description)
        self.isa = current_isa()
        pool = get_pool(self.threads)
        self._op = _engine.Linear(pool, self.isa, weight.spec(), groups=self.heads)
        self._attention = _engine.LatentAttention(pool, self.isa)
        self._weight = weight
        self.loaded = True

    def unload(self) -> None:
        self._op = None
        self._attention = None
        self._weight = None
        self.loaded = False

    def memory(self) -> BackendMemory:
        if self._weight is None:
            return BackendMemory()
        return BackendMemory(
            mapped=self._weight.mapped_bytes, repacked=self._weight.repacked_bytes, shared=scratch_memory(get_pool(self.threads))
        )

    @property
    def weight_type(self) -> str | None:
        """GGML type the engine computes on (after `load`)."""
        return self._weight.ggml_type if self._weight is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._op is None:
            raise RuntimeError(f"KHeadwiseLinearCPUInfer at {self.key} used before load()")
        if tuple(x.shape[-2:]) != (self.heads, self.in_features):
            raise ValueError(
                f"KHeadwiseLinearCPUInfer at {self.key}: input ends in {tuple(x.shape[-2:])}, "
                f"expected ({self.heads}, {self.in_features})"
            )
        rows = engine_rows(x, self.heads * self.in_features)  # widened by the engine
        out = torch.empty(rows.shape[0], self.heads * self.out_features, dtype=torch.float32)
        self._op.forward(rows.data_ptr(), rows.shape[0], out.data_ptr(), 0, ENGINE_DTYPES[rows.dtype], "F32")
        return out.view(*x.shape[:-2], self.heads, self.out_features)

    def latent_attention(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        visible_keys: torch.Tensor,
        scale: float,
    ) -> torch.Tensor | None:
        """The absorbed attention core as one engine job, reading the cache in its own dtype."""
        if self._attention is None:
            raise RuntimeError(f"KHeadwiseLinearCPUInfer at {self.key} used before load()")
        cached = (c_kv, k_pe)
        if any(t.device.type != "cpu" or t.dtype not in _CACHE_TYPES or t.dim() != 2 or t.stride(-1) != 1 for t in cached):
            return None  # a cache the kernel cannot read in place: let torch compute it
        queries, heads, latent = q_latent.shape
        rope = q_pe.shape[-1]
        keys = c_kv.shape[0]
        q_latent = q_latent.to(torch.float32).contiguous()
        q_pe = q_pe.to(torch.float32).contiguous()
        visible = visible_keys.to(device="cpu", dtype=torch.int32).contiguous()
        if visible.numel() != queries:
            raise ValueError(f"visible_keys has {visible.numel()} counts for {queries} queries")
        out = torch.empty(queries, heads, latent, dtype=torch.float32)
        rows = [(t.data_ptr(), _CACHE_TYPES[t.dtype], t.stride(0) * t.element_size()) for t in cached]
        self._attention.forward(q_latent.data_ptr(), q_pe.data_ptr(), queries, heads, latent, rope, rows[0], rows[1],
                                keys, visible.data_ptr(), float(scale), out.data_ptr())
        return out

    def fused_absorbed_attention(self, parts: AbsorbedAttentionParts) -> FusedAbsorbedAttention | None:
        """The whole absorbed step as one engine job when every part of it is an engine op."""
        if self._op is None:
            raise RuntimeError(f"KHeadwiseLinearCPUInfer at {self.key} used before load()")
        return EngineAbsorbedAttention.create(self, parts, self.isa or current_isa(), self.threads)

    def extra_repr(self) -> str:
        return (
            f"{self.heads} x {self.in_features}->{self.out_features}, isa={self.isa or 'not loaded'}, "
            f"weight={self.weight_type}"
        )
