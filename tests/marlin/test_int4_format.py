"""The int4 format: quantization error bounds, the scale rounding rule, and exact packing.

Bounds, derived from the format (`kt_ops_marlin.int4`): a group's scale is
``s = absmax / 7.5`` (rounded up to the scale dtype) and every element is rounded to the
nearest of ``-8s … 7s``, so

* per element, ``|w - q·s| ≤ s / 2`` — the clamped ``+absmax`` (7.5 s → 7 s) sits exactly
  on the bound; float32 arithmetic (``w / s``, ``q·s`` with a float32 scale, the
  subtraction) adds a few ulps of ``|w|``, hence a slack of ``2^-22 · |w|``;
* rounding errors of continuous weights are close to uniform on ``[-s/2, s/2]``, so the
  RMS error is ``≈ sqrt(mean(s²) / 12)``; 10 % slack covers sampling and the clamped edge;
* for Gaussian weights N(0, σ²) with groups of 128, E[absmax] ≈ 2.8 σ, so the relative
  RMS error is ≈ 2.8 / 7.5 / √12 ≈ 0.11 (per-channel over K = 4096: ≈ 3.9 / 7.5 / √12 ≈ 0.15).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kt_ops_marlin.group_size import shape_problem, validate_group_size
from kt_ops_marlin.int4 import dequantize_int4, quantize_int4
from kt_ops_marlin.packing import pack_int4, unpack_int4


def _group_scales(qw, shape):
    """Each element's scale, ``[N, K]``."""
    return qw.scales.float().repeat_interleave(qw.group_size, dim=-1).reshape(shape)


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_is_at_most_half_a_step(group_size, scale_dtype):
    torch.manual_seed(0)
    w = torch.randn(96, 512) * torch.logspace(-3, 1, 96).unsqueeze(1)  # rows of very different magnitude
    qw = quantize_int4(w, group_size, scale_dtype)
    assert qw.q.dtype == torch.int8 and int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
    assert qw.scales.dtype == scale_dtype
    err = (w - qw.dequantize()).abs()
    half_step = _group_scales(qw, w.shape) / 2
    assert bool((err <= half_step + w.abs() * 2**-22).all())
    # The stored scale is the exact absmax / 7.5 rounded up, never down (by less than one ulp of its dtype).
    absmax = w.reshape(96, -1, qw.group_size).abs().amax(-1)
    exact = absmax / 7.5
    stored = qw.scales.float()
    assert bool((stored >= exact).all())
    assert bool((stored <= exact * (1 + 2 * torch.finfo(scale_dtype).eps)).all())


@pytest.mark.parametrize(("group_size", "k", "expected"), [(128, 4096, 0.11), (32, 4096, 0.09), (-1, 4096, 0.15)])
def test_rms_error_of_gaussian_weights(group_size, k, expected):
    torch.manual_seed(1)
    w = torch.randn(256, k)
    qw = quantize_int4(w, group_size)
    err = w - qw.dequantize()
    rms = err.pow(2).mean().sqrt()
    uniform_model = (_group_scales(qw, w.shape).pow(2).mean() / 12).sqrt()
    assert rms <= 1.1 * uniform_model
    relative = float(rms / w.pow(2).mean().sqrt())
    assert relative == pytest.approx(expected, rel=0.12)


def test_all_zero_group_stays_zero():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-2, 2, 64)
    qw = quantize_int4(w, 32)
    assert torch.equal(qw.dequantize()[0], torch.zeros(64))
    assert float(qw.scales[0, 0]) == 0.0 and float(qw.scales[1, 0]) == pytest.approx(2 / 7.5)


def test_leading_dimensions_are_independent_weights():
    torch.manual_seed(2)
    w = torch.randn(3, 40, 64)
    stacked = quantize_int4(w, 32, torch.bfloat16)
    for e in range(3):
        one = quantize_int4(w[e], 32, torch.bfloat16)
        assert torch.equal(stacked.q[e], one.q) and torch.equal(stacked.scales[e], one.scales)


def test_dequantize_is_exact_q_times_scale():
    torch.manual_seed(3)
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    scales = torch.rand(16, 2).to(torch.bfloat16)
    w = dequantize_int4(q, scales, 32)
    assert torch.equal(w, q.double().mul(scales.double().repeat_interleave(32, -1)).float())
    with pytest.raises(ValueError, match="do not fit scales"):
        dequantize_int4(q, scales, 64)


def test_group_size_rules():
    for ok in (-1, 32, 64, 96, 128, 256, 512):
        assert validate_group_size(ok) == ok
    for bad in (0, -2, 16, 48, 100):
        with pytest.raises(ValueError, match="positive multiple of 32"):
            validate_group_size(bad)
    assert shape_problem("x.weight", 256, 128) is None
    assert shape_problem("x.weight", 48, -1) is None
    message = shape_problem("model.layers.0.mlp.down_proj.weight", 10944, 128)
    assert message is not None
    assert "model.layers.0.mlp.down_proj.weight" in message and "K=10944" in message and "group_size=128" in message
    assert "group_size: 64" in message  # the hint names a group size that fits
    assert "multiple of 8" in shape_problem("w", 20, -1)
    with pytest.raises(ValueError, match="K=96 is not divisible by group_size=64"):
        quantize_int4(torch.randn(4, 96), 64)


def test_non_finite_weights_and_scale_overflow_are_errors():
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int4(torch.full((2, 32), float("nan")), 32)
    with pytest.raises(ValueError, match="overflows torch.float16"):
        quantize_int4(torch.full((2, 32), 1e6), 32, torch.float16)


def test_packed_layout_is_the_documented_one():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]], dtype=torch.int8)  # N=2, K=8
    packed = pack_int4(q)
    assert packed.shape == (1, 2) and packed.dtype == torch.int32
    for n in range(2):
        word = int(packed[0, n]) & 0xFFFFFFFF
        nibbles = [(word >> (4 * j)) & 0xF for j in range(8)]
        assert nibbles == [int(v) + 8 for v in q[n]]  # value k at bits 4k…4k+3, offset binary


@settings(max_examples=60, deadline=None)
@given(
    lead=st.sampled_from([(), (1,), (3,)]),
    n=st.integers(1, 40),
    k_words=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(lead, n, k_words, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (*lead, n, 8 * k_words), generator=gen, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (*lead, k_words, n)
    assert torch.equal(unpack_int4(packed), q)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="K=12 is not a multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\]"):
        pack_int4(torch.full((2, 8), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="int32"):
        unpack_int4(torch.zeros(2, 8, dtype=torch.int64))


def test_chunked_quantization_equals_one_pass(monkeypatch):
    """Large weights are quantized in row chunks; chunk boundaries change nothing."""
    from kt_ops_marlin import int4

    torch.manual_seed(4)
    w = torch.randn(37, 256)
    whole = quantize_int4(w, 64, torch.bfloat16)
    monkeypatch.setattr(int4, "_CHUNK_ELEMENTS", 5 * 256)  # 5 rows per chunk, the last one short
    chunked = quantize_int4(w, 64, torch.bfloat16)
    assert torch.equal(whole.q, chunked.q) and torch.equal(whole.scales, chunked.scales)
