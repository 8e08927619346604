"""`cpu_matmul_dtype` and `matmul_weight`: 16-bit CPU matmuls only where the CPU makes them fast."""

from __future__ import annotations

import pytest
import torch

from kt_core import cpu_matmul


@pytest.fixture
def cpu_features(monkeypatch):
    """Pretend the CPU has exactly the given torch capability names."""

    def pretend(*names: str) -> None:
        monkeypatch.setattr(cpu_matmul, "_cpu_capabilities", lambda: frozenset(names))

    return pretend


@pytest.mark.parametrize(
    ("features", "dtype", "native", "kept_as"),
    [
        ((), torch.bfloat16, False, torch.float32),
        (("avx2", "avx512_f"), torch.bfloat16, False, torch.float32),
        # dot products, but slower than float32 (the Xeon VM without AMX): kept in float32
        (("avx512_bf16",), torch.bfloat16, True, torch.float32),
        (("avx512_bf16", "amx_bf16"), torch.bfloat16, True, torch.bfloat16),
        (("amx_bf16",), torch.bfloat16, True, torch.bfloat16),
        (("avx512_bf16",), torch.float16, False, torch.float32),
        (("amx_fp16",), torch.float16, True, torch.float16),
        (("avx512_fp16",), torch.float16, True, torch.float16),
        ((), torch.float32, True, torch.float32),
        ((), torch.float64, True, torch.float64),
    ],
)
def test_matmul_dtype_follows_the_cpu_features(cpu_features, features, dtype, native, kept_as):
    cpu_features(*features)
    assert cpu_matmul.has_native_cpu_matmul(dtype) == native
    assert cpu_matmul.cpu_matmul_dtype(dtype) == kept_as
    assert cpu_matmul.has_fast_cpu_matmul(dtype) == (kept_as == dtype)


def test_capabilities_are_torch_s_present_features():
    cpu_matmul._cpu_capabilities.cache_clear()
    reported = torch.cpu.get_capabilities()
    seen = cpu_matmul._cpu_capabilities()
    assert seen == {name for name, present in reported.items() if present is True}


def test_matmul_weight_upcasts_only_a_prefill_s_product_on_a_slow_cpu(cpu_features):
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    cpu_features()
    assert cpu_matmul.matmul_weight(weight, cpu_matmul.UPCAST_MIN_ROWS - 1) is weight
    upcast = cpu_matmul.matmul_weight(weight, cpu_matmul.UPCAST_MIN_ROWS)
    assert upcast.dtype == torch.float32 and torch.equal(upcast, weight.float())
    cpu_features("avx512_bf16")
    assert cpu_matmul.matmul_weight(weight, 512) is weight
    f32 = weight.float()
    cpu_features()
    assert cpu_matmul.matmul_weight(f32, 512) is f32
