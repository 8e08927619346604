"""MLA's absorbed decode step as one engine job (`_engine.AbsorbedMLA`).

When every part of an MLA layer is already on the engine — the projections on
`KLinearCPUInfer`, the norms on `KRMSNormCPUInfer`, the per-head products on
`KHeadwiseLinearCPUInfer` — the step between them is glue: some thirty torch ops per
layer per token (splits, the rotary embedding, casts, the cache write), each a few
microseconds of dispatch, plus a pool wake-up for each of six engine calls. This runs it
as one job over the same engine ops, with the same roundings, writing the new cache rows
in place; the attention falls back to the op-by-op form whenever any part is something
else.
"""

from __future__ import annotations

import torch
from torch import nn

from kt_core.absorbed_attention import AbsorbedAttentionParts
from kt_ops_cpuinfer import _engine
from kt_ops_cpuinfer.dtypes import ENGINE_DTYPES
from kt_ops_cpuinfer.linear import KLinearCPUInfer
from kt_ops_cpuinfer.pool import get_pool
from kt_ops_cpuinfer.rms_norm import KRMSNormCPUInfer


def _engine_linear(module: nn.Module | None) -> object | None:
    """The engine op of a loaded, bias-free `KLinearCPUInfer` (the fused job adds no bias), else None."""
    if isinstance(module, KLinearCPUInfer) and module.loaded and module.bias is None:
        return module._op
    return None


def _norm_weight(module: nn.Module | None) -> tuple[int, str, float] | None:
    if isinstance(module, KRMSNormCPUInfer) and module.weight is not None:
        return (module.weight.data_ptr(), ENGINE_DTYPES[module.weight.dtype], float(module.eps))
    return None


def _bound_state(module: nn.Module) -> object:
    """The object of `module` a fused job holds on to: its engine op, or a norm's weight."""
    return module.weight if isinstance(module, KRMSNormCPUInfer) else module._op


class EngineAbsorbedAttention:
    """`FusedAbsorbedAttention` on the CPU engine; build it with `create`."""

    def __init__(self, op: object, norm_dtype: torch.dtype, rope_form: str, hidden: int, modules: tuple[nn.Module, ...]):
        self._op = op
        self._norm_dtype = norm_dtype
        self.rope_form = rope_form
        self.hidden = hidden
        # What the job reads, as it was when the job was built: an engine op or norm weight
        # that has since been replaced (a module unloaded and loaded again) makes it stale.
        self._bound = tuple((m, _bound_state(m)) for m in modules)

    def stale(self) -> bool:
        """Whether a part was reloaded since `create` (the job would read the old weights)."""
        return any(_bound_state(m) is not state for m, state in self._bound)

    @classmethod
    def create(cls, uk: nn.Module, parts: AbsorbedAttentionParts, isa: str, threads: int | None) -> EngineAbsorbedAttention | None:
        """The fused step over `parts` with `uk`'s engine op as W_UK, or None when a part is not an engine op."""
        from kt_ops_cpuinfer.headwise import KHeadwiseLinearCPUInfer

        if not (isinstance(uk, KHeadwiseLinearCPUInfer) and isinstance(parts.value_heads, KHeadwiseLinearCPUInfer)):
            return None
        if uk._op is None or parts.value_heads._op is None:
            return None
        kv_a, o = _engine_linear(parts.kv_a_proj), _engine_linear(parts.o_proj)
        kv_norm = _norm_weight(parts.kv_a_layernorm)
        if parts.q_proj is not None:
            q_a, q_a_norm, q = None, (0, "F32", 0.0), _engine_linear(parts.q_proj)
        else:
            q_a, q_a_norm, q = _engine_linear(parts.q_a_proj), _norm_weight(parts.q_a_layernorm), _engine_linear(parts.q_b_proj)
            if q_a is None or q_a_norm is None:
                return None
        if q is None or kv_a is None or o is None or kv_norm is None:
            return None
        linears = [m for m in (parts.q_proj, parts.q_a_proj, parts.q_b_proj, parts.kv_a_proj, parts.o_proj) if m is not None]
        if any(m.isa != isa for m in linears) or parts.value_heads.isa != isa:
            return None
        op = _engine.AbsorbedMLA(
            get_pool(threads), isa, (parts.heads, parts.nope, parts.rope, parts.latent, parts.v_dim),
            q_a, q_a_norm, q, kv_a, kv_norm, uk._op, parts.value_heads._op, o, parts.rope_form, float(parts.scale),
        )
        assert isinstance(parts.kv_a_layernorm, KRMSNormCPUInfer) and parts.kv_a_layernorm.weight is not None
        modules = (*linears, parts.kv_a_layernorm, uk, parts.value_heads)
        if parts.q_a_layernorm is not None:
            modules += (parts.q_a_layernorm,)
        hidden = int(parts.o_proj.out_features)
        return cls(op, parts.kv_a_layernorm.weight.dtype, parts.rope_form, hidden, modules)

    def __call__(
        self,
        x: torch.Tensor,
        rotary: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
        start: int,
        visible: list[int],
    ) -> torch.Tensor | None:
        dtype = x.dtype
        if self.stale():
            return None
        if dtype not in ENGINE_DTYPES or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.hidden:
            return None
        if keys.dtype != torch.promote_types(dtype, self._norm_dtype) or values.dtype != dtype:
            return None
        if any(t.device.type != "cpu" or t.dim() != 2 or t.stride(-1) != 1 for t in (keys, values)):
            return None
        tokens = x.shape[0]
        if isinstance(rotary, torch.Tensor):
            if self.rope_form != "complex" or rotary.dtype != torch.complex64:
                return None
            cos = sin = torch.view_as_real(rotary).contiguous()
            table_type = "F32"
        else:
            if self.rope_form == "complex" or rotary[0].dtype != dtype or rotary[1].dtype != dtype:
                return None
            cos, sin = rotary[0].contiguous(), rotary[1].contiguous()
            table_type = ENGINE_DTYPES[dtype]
        rows = x.contiguous()
        counts = torch.tensor(visible, dtype=torch.int32)
        out = torch.empty(tokens, self.hidden, dtype=dtype)
        kind = ENGINE_DTYPES[dtype]
        cached = [(t.data_ptr(), ENGINE_DTYPES[t.dtype], t.stride(0) * t.element_size()) for t in (keys, values)]
        self._op.forward(rows.data_ptr(), kind, tokens, cos.data_ptr(), sin.data_ptr(), table_type, cached[0], cached[1],
                         int(start), keys.shape[0], counts.data_ptr(), out.data_ptr())
        return out
