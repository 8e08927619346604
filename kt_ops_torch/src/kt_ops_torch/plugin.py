"""Registrations of kt-ops-torch (entry point ``kt-ops-torch`` in group ``kt``)."""

from __future__ import annotations

from collections.abc import Callable

from kt_core import OperatorKind, hookimpl
from kt_ops_torch.kwargs import TorchBackendKwargs

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
