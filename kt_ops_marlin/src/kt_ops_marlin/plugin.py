"""Registrations of kt-ops-marlin (entry point ``kt-ops-marlin`` in group ``kt``)."""

from __future__ import annotations

from collections.abc import Callable

from kt_core import OperatorKind, hookimpl
from kt_ops_marlin.kwargs import MarlinBackendKwargs
from kt_ops_marlin.notes import DEVICE_NOTES

_KT = "ktransformers.operators"


@hookimpl
def register_operators(register: Callable[..., None]) -> None:
    register(
        name="KLinearMarlin",
        target="kt_ops_marlin.linear:KLinearMarlin",
        kind=OperatorKind.LINEAR_BACKEND,
        summary=(
            "linear layer as symmetric int4 with group scales, quantized at load from any source: "
            "Triton kernel on cuda; on cpu the same int4 weights through torch's CPU int4 matmul"
        ),
        kwargs_model=MarlinBackendKwargs,
        devices=("cuda", "cpu"),
        aliases=(f"{_KT}.linear.KLinearMarlin", "QuantizedLinearMarlin"),
        device_notes=tuple(DEVICE_NOTES.items()),
    )
    register(
        name="KExpertsMarlin",
        target="kt_ops_marlin.experts:KExpertsMarlin",
        kind=OperatorKind.EXPERTS_BACKEND,
        summary=(
            "routed experts as per-expert int4 weights, tokens grouped by expert: Triton kernel on cuda; "
            "on cpu the same int4 weights through torch's CPU int4 matmul"
        ),
        kwargs_model=MarlinBackendKwargs,
        devices=("cuda", "cpu"),
        aliases=(f"{_KT}.experts.KExpertsMarlin", "MLPCUDAExperts"),
        device_notes=tuple(DEVICE_NOTES.items()),
    )
