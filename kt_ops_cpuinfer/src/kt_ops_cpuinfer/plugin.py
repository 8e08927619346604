"""Registrations of kt-ops-cpuinfer (entry point ``kt-ops-cpuinfer`` in group ``kt``).

Only the kwargs model is imported here; the operators (and the C++ extension) load when a
rule first uses them.
"""

from __future__ import annotations

from collections.abc import Callable

from kt_core import OperatorKind, hookimpl
from kt_core.operator_kwargs import OperatorKwargs
from kt_ops_cpuinfer.kwargs import CPUInferKwargs, CPUInferMLPKwargs

_KT = "ktransformers.operators"


@hookimpl
def register_operators(register: Callable[..., None]) -> None:
    register(
        name="KExpertsCPU",
        target="kt_ops_cpuinfer.experts:KExpertsCPU",
        kind=OperatorKind.EXPERTS_BACKEND,
        summary="routed experts by the native CPU engine on the GGUF blocks, asynchronous (submit/sync)",
        kwargs_model=CPUInferKwargs,
        devices=("cpu",),
        aliases=(f"{_KT}.experts.KExpertsCPU", "MLPCPUExperts"),
    )
    register(
        name="KLinearCPUInfer",
        target="kt_ops_cpuinfer.linear:KLinearCPUInfer",
        kind=OperatorKind.LINEAR_BACKEND,
        summary="linear layer by the native CPU engine on the GGUF blocks",
        kwargs_model=CPUInferKwargs,
        devices=("cpu",),
        aliases=(f"{_KT}.linear.KLinearCPUInfer",),
    )
    register(
        name="KHeadwiseLinearCPUInfer",
        target="kt_ops_cpuinfer.headwise:KHeadwiseLinearCPUInfer",
        kind=OperatorKind.HEADWISE_BACKEND,
        summary="per-head products (MLA's absorbed W_UK/W_UV) by the native CPU engine on the GGUF blocks",
        kwargs_model=CPUInferKwargs,
        devices=("cpu",),
    )
    register(
        name="KMLPCPUInfer",
        target="kt_ops_cpuinfer.mlp:KMLPCPUInfer",
        kind=OperatorKind.MODULE,
        summary="gated MLP (shared experts, dense layers) as one engine job on the GGUF blocks; match with recursive: False",
        kwargs_model=CPUInferMLPKwargs,
        devices=("cpu",),
    )
    register(
        name="KRMSNormCPUInfer",
        target="kt_ops_cpuinfer.rms_norm:KRMSNormCPUInfer",
        kind=OperatorKind.MODULE,
        summary="RMSNorm (DeepSeek, Qwen, Mixtral, Llama) in one engine call with transformers' roundings",
        kwargs_model=OperatorKwargs,
        devices=("cpu",),
    )
