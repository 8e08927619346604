"""The float dtype in which torch's matmuls should run on this machine's CPU.

torch multiplies bfloat16 or float16 matrices on the CPU at full speed only where the CPU
has 16-bit dot-product instructions (AVX512-BF16 or AMX-BF16 for bfloat16, AVX512-FP16 or
AMX-FP16 for float16). Elsewhere it takes a generic path: on this project's AVX2 machine
(Zen 3, 2 cores) a 128x512 by 512x4096 product took 57 ms in bfloat16 and 47 ms in float16
against 10 ms in float32, and DeepSeek-V2-Lite's expanded MLA prefill of 128 tokens 103 ms
per layer against 8 ms. Operators with large torch matmuls on the CPU ask
`cpu_matmul_dtype` and compute in what it returns.
"""

from __future__ import annotations

import functools

import torch

# The CPU features with which torch's CPU matmuls run natively in each 16-bit dtype.
_NATIVE_FEATURES: dict[torch.dtype, tuple[str, ...]] = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


@functools.cache
def _cpu_capabilities() -> frozenset[str]:
    """The CPU's features as torch sees them (``torch.cpu.get_capabilities``), once per process."""
    return frozenset(name for name, present in torch.cpu.get_capabilities().items() if present is True)


def has_native_cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether torch's CPU matmuls in `dtype` run on the CPU's own instructions.

    Float32 and float64 always do; a 16-bit dtype only with its dot-product extension.
    """
    features = _NATIVE_FEATURES.get(dtype)
    return features is None or any(name in _cpu_capabilities() for name in features)


def cpu_matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """`dtype`, or float32 where this CPU would multiply `dtype` matrices on a slow generic path."""
    return dtype if has_native_cpu_matmul(dtype) else torch.float32
