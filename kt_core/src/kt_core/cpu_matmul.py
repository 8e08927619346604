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


# Activation rows from which a product with a 16-bit weight on such a CPU runs faster with
# the weight converted to float32 for the call: 1408x2048 bfloat16 on the AVX2 machine took
# 4.9 ms at 8 rows either way, 7.5 against 4.7 ms at 16 rows, 14.6 against 4.0 at 32.
UPCAST_MIN_ROWS = 16


def matmul_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` in the dtype its product with `rows` activation rows should run in.

    On a CPU without dot products for the weight's 16-bit dtype, a float32 copy made for
    this call once `rows` reaches `UPCAST_MIN_ROWS` (a prefill); the weight itself
    otherwise, so a decode step never pays the conversion and nothing is stored twice.
    """
    if weight.device.type != "cpu" or rows < UPCAST_MIN_ROWS:
        return weight
    dtype = cpu_matmul_dtype(weight.dtype)
    return weight if dtype == weight.dtype else weight.to(dtype)
