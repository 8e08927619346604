"""The float dtype in which torch's matmuls should run on this machine's CPU.

torch multiplies bfloat16 or float16 matrices on the CPU at full speed only where the CPU
has 16-bit dot-product instructions (AVX512-BF16 or AMX-BF16 for bfloat16, AVX512-FP16 or
AMX-FP16 for float16). Elsewhere it takes a generic path: on this project's AVX2 machine
(Zen 3, 2 cores) a 128x512 by 512x4096 product took 57 ms in bfloat16 and 47 ms in float16
against 10 ms in float32, and DeepSeek-V2-Lite's expanded MLA prefill of 128 tokens 103 ms
per layer against 8 ms. Operators with large torch matmuls on the CPU ask
`cpu_matmul_dtype` and compute in what it returns.

Dot-product instructions alone do not make bfloat16 as fast as float32: on the Xeon VM
without AMX (AVX512-BF16, 2 cores), oneDNN's AVX512-BF16 kernel took 3.3 ms for the
128x512 by 512x4096 product against float32's 2.4 ms (12.6 against 6.6 ms at 512 rows),
while float16 on AVX512-FP16 kept float32's speed (2.3 and 6.9 ms). So a weight whose
dtype is chosen once, at load, is kept in bfloat16 only where the CPU has AMX-BF16
(`cpu_matmul_dtype`); converting a weight for each call pays only where the 16-bit
product has no dot-product instructions at all (`matmul_weight`): with AVX512-BF16 the
conversion cost as much as it saved up to ~100 rows, and far more for large weights
(32-128 rows by a 12800x2048 weight: 36-52 ms against 12-41 ms in bfloat16).
"""

from __future__ import annotations

import functools

import torch

# The CPU features with which torch's CPU matmuls run natively in each 16-bit dtype.
_NATIVE_FEATURES: dict[torch.dtype, tuple[str, ...]] = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}

# The CPU features with which they are also at least as fast as float32 (module docstring).
_FAST_FEATURES: dict[torch.dtype, tuple[str, ...]] = {
    torch.bfloat16: ("amx_bf16",),
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
    return _has_any(_NATIVE_FEATURES, dtype)


def has_fast_cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether torch's CPU matmuls in `dtype` are at least as fast as in float32 on this CPU."""
    return _has_any(_FAST_FEATURES, dtype)


def _has_any(table: dict[torch.dtype, tuple[str, ...]], dtype: torch.dtype) -> bool:
    """True for a dtype the table does not list (float32, float64), else whether the CPU has one of its features."""
    features = table.get(dtype)
    return features is None or any(name in _cpu_capabilities() for name in features)


def cpu_matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which to keep a weight of `dtype` whose products run in torch on this CPU.

    `dtype` where its matmuls are at least as fast as float32's, else float32.
    """
    return dtype if has_fast_cpu_matmul(dtype) else torch.float32


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
    if weight.device.type != "cpu" or rows < UPCAST_MIN_ROWS or has_native_cpu_matmul(weight.dtype):
        return weight
    return weight.to(torch.float32)
