"""Kwargs of the CPU engine's backends (imported at registration, before any operator is used)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from kt_core.operator_kwargs import BackendKwargs, OperatorKwargs


class CPUInferKwargs(BackendKwargs):
    """Kwargs of `KExpertsCPU`, `KLinearCPUInfer` and `KHeadwiseLinearCPUInfer`."""

    threads: PositiveInt | None = Field(
        None,
        description=(
            "Worker threads of the engine's pool; the machine's physical cores when omitted. Backends "
            "asking for the same count share one pool (each keeps its own buffers)."
        ),
    )
    backend: Literal["llamafile", "kt"] | None = Field(
        None,
        description=(
            "Accepted so KTransformers rule files load unchanged (there it picks the llamafile or the "
            "kt kernel family). kt has one engine, which computes on the GGUF blocks with AVX2 or AVX-512 "
            "kernels chosen by CPUID (force one with KT_CPUINFER_ISA), so the value changes nothing."
        ),
    )


class CPUInferMLPKwargs(OperatorKwargs, CPUInferKwargs):
    """Kwargs of `KMLPCPUInfer`: where it runs (the CPU) and the engine's `threads`/`backend`."""
