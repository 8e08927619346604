"""Registrations of kt-ops-torch (entry point ``kt-ops-torch`` in group ``kt``)."""

from __future__ import annotations

from collections.abc import Callable

from kt_core import OperatorKind, hookimpl
from kt_ops_torch.kwargs import RMSNormKwargs, RotaryEmbeddingKwargs, TorchBackendKwargs

_KT = "ktransformers.operators"


@hookimpl
def register_operators(register: Callable[..., None]) -> None:
    register(
        name="KLinearTorch",
        target="kt_ops_torch.linear:KLinearTorch",
        kind=OperatorKind.LINEAR_BACKEND,
        summary="linear layer as a float matmul in PyTorch (weights dequantized at load)",
        kwargs_model=TorchBackendKwargs,
        aliases=(f"{_KT}.linear.KLinearTorch",),
    )
    register(
        name="KExpertsTorch",
        target="kt_ops_torch.experts:KExpertsTorch",
        kind=OperatorKind.EXPERTS_BACKEND,
        summary="routed experts in PyTorch, tokens grouped by expert (weights dequantized at load)",
        kwargs_model=TorchBackendKwargs,
        aliases=(f"{_KT}.experts.KExpertsTorch",),
    )
    register(
        name="RotaryEmbedding",
        target="kt_ops_torch.rope:RotaryEmbedding",
        kind=OperatorKind.MODULE,
        summary="rotary embedding returning (cos, sin), frequencies computed at load for any transformers rope_type",
        kwargs_model=RotaryEmbeddingKwargs,
        aliases=(f"{_KT}.RoPE.RotaryEmbedding",),
    )
    register(
        name="RMSNorm",
        target="kt_ops_torch.rmsnorm:RMSNorm",
        kind=OperatorKind.MODULE,
        summary="RMSNorm computed in float32 like transformers', weight read at load",
        kwargs_model=RMSNormKwargs,
        aliases=(f"{_KT}.layernorm.RMSNorm",),
    )
