"""The CPU path (torch's CPU int4 matmul) against the dequantized reference ``x @ (q·s)ᵀ``.

The weights are the same int4 values and scales, so only the arithmetic differs: the
kernel dequantizes ``(u - 8)·s`` and accumulates in float32. Tolerances:

* float32 activations: float32 summation order only — atol 1e-5 on outputs whose
  magnitude is ~10 (K ≤ 512 terms of ~0.1·1·…), ~100 ulps of headroom; a wrong nibble,
  group or scale changes outputs by > 1e-2;
* bfloat16 / float16 activations: the output is rounded to the 16-bit dtype, so the
  error is half an ulp of the output (2^-9 / 2^-12 relative) plus accumulation noise:
  rtol 2^-8 / 2^-10, atol 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from kt_ops_marlin.cpu_int4 import cpu_int4_available, prepare_cpu_int4
from kt_ops_marlin.int4 import quantize_int4

pytestmark = pytest.mark.skipif(not cpu_int4_available(), reason="torch has no CPU int4 matmul")

TOL = {
    torch.float32: dict(rtol=0, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-8, atol=1e-3),
    torch.float16: dict(rtol=2**-10, atol=1e-3),
}


def _check(n: int, k: int, group_size: int, dtype: torch.dtype, lead: tuple[int, ...] = (3,)) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    weight = torch.randn(n, k, generator=gen) * 0.1
    qw = quantize_int4(weight, group_size, dtype)
    prepared = prepare_cpu_int4(qw, dtype)
    x = torch.randn(*lead, k, generator=gen).to(dtype)
    got = prepared(x)
    expected = x.float() @ qw.dequantize().t()
    assert got.shape == (*lead, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_supported_groups(dtype, group_size):
    _check(48, 512, group_size, dtype)


@pytest.mark.parametrize(
    ("n", "k", "group_size"),
    [
        (40, 192, 96),  # a group of 96 = three CPU groups of 32 sharing a scale
        (32, 1024, 512),  # a group of 512 = two CPU groups of 256
        (24, 64, -1),  # per-channel: one scale repeated over the CPU groups
        (16, 48, -1),  # per-channel with K not a multiple of 32: zero-padded K
        (1, 64, 32),  # N = 1 (a gate): zero-padded to 16 output rows, sliced off
        (60, 128, 128),  # N = 60 (Qwen2-57B's router width) is not a multiple of 16
    ],
)
def test_layouts_the_cpu_kernel_cannot_take_directly(n, k, group_size):
    for dtype in (torch.float32, torch.bfloat16):
        _check(n, k, group_size, dtype)


@pytest.mark.parametrize("lead", [(1,), (64,), (2, 5)])
def test_batch_shapes(lead):
    _check(32, 128, 32, torch.float32, lead)


def test_rejects_wrong_width_and_stacked_weights():
    qw = quantize_int4(torch.randn(16, 64), 32)
    prepared = prepare_cpu_int4(qw, torch.float32)
    with pytest.raises(ValueError, match="x has 32 features, the weight takes 64"):
        prepared(torch.randn(2, 32))
    with pytest.raises(ValueError, match="one \\[N, K\\] weight"):
        prepare_cpu_int4(quantize_int4(torch.randn(2, 16, 64), 32), torch.float32)


def test_holds_four_bits_per_weight():
    qw = quantize_int4(torch.randn(256, 1024), 128, torch.bfloat16)
    prepared = prepare_cpu_int4(qw, torch.bfloat16)
    assert prepared.packed.dtype == torch.uint8 and prepared.packed.numel() == 256 * 1024 // 2
    # scales and zeros: 2 × 2 bytes per group of 128 → 1/32 byte per weight on top of 1/2
    assert prepared.nbytes == 256 * 1024 // 2 + 256 * (1024 // 128) * 2 * 2
