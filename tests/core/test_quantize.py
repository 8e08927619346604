"""kt's GGUF quantizers, checked by round trip through gguf-py's independent dequantizers.

gguf-py can dequantize every type we write but quantize only some of them. Where it
can (F32, F16, BF16, Q8_0, Q4_0) our bytes must be identical to its bytes: both follow
ggml's reference arithmetic. gguf-py has no K-quant or i-quant quantizer, so Q2_K, Q3_K,
Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS are checked by the error of the round trip instead,
against bounds derived from each format's step size (and, for the low-bit types, against
a plain min-max quantizer of the same type), and by the bytes being readable as the
right type and shape from a real GGUF file.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kt_core.errors import KtUserError
from kt_core.quant.quantize import (
    QUANTIZABLE_TYPES,
    NonFiniteTensorError,
    QuantizationShapeError,
    UnsupportedQuantizationTypeError,
    can_quantize,
    quantize,
)

Q = gguf.GGMLQuantizationType
BLOCK_TYPES = ["Q8_0", "Q4_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
FLOAT_TYPES = ["F32", "F16", "BF16"]
# Types gguf-py can also write; for these our output must be byte-identical.
GGUF_PY_WRITES = ["F32", "F16", "BF16", "Q8_0", "Q4_0"]


def roundtrip(x: torch.Tensor, ggml_type: str) -> np.ndarray:
    """Quantize with kt, dequantize with gguf-py."""
    return gguf_dequantize(quantize(x, ggml_type), Q[ggml_type])


def relative_rms(x: torch.Tensor, y: np.ndarray) -> float:
    reference = x.double().numpy()
    return float(np.linalg.norm(y - reference) / np.linalg.norm(reference))


def gaussian(rows: int = 64, cols: int = 1024, seed: int = 1234) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def with_outliers(rows: int = 64, cols: int = 1024, seed: int = 1234) -> torch.Tensor:
    """Gaussian with 1% of the values 30x larger, like the outlier channels of LLM weights."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator)
    mask = torch.rand(rows, cols, generator=generator) < 0.01
    x[mask] *= 30
    return x


def block_view(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """Raw bytes as (n_blocks, type_size)."""
    return data.reshape(-1, gguf.GGML_QUANT_SIZES[Q[ggml_type]][1])


def f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)[:, 0]


# --- error bounds -----------------------------------------------------------------------
#
# A uniform quantizer with step Δ leaves an rms error of Δ/√12. Per format, for N(0, 1)
# data (E[·] from 200k simulated blocks):
#   Q8_0  Δ = max|x|/127 over 32 values, E max|x| ≈ 2.35 → 0.54%        (measured 0.53%)
#   Q4_0  Δ = max|x|/8 (the signed extreme maps to -8) → 8.6%           (measured 8.6%)
#   Q4_K  Δ = range/15 over 32 values, E range ≈ 4.14 → 8.1% naively;   (measured 7.1%)
#   Q5_K  Δ = range/31 → 3.9% naively;                                  (measured 3.6%)
#   Q6_K  Δ = max|x|/32 over 16 values, E max|x| ≈ 2.08 → 1.9% naively; (measured 1.8%)
#   Q2_K  Δ = range/3 over 16 values, E range ≈ 3.53 → 34% naively;     (measured 26.9%)
#   Q3_K  Δ = max|x|/4 over 16 values, E max|x| ≈ 2.08 → 15.0% naively; (measured 14.3%)
#   IQ4_NL  codebook of 16 entries over [-127, 113]·d, d = max|x|/127 over 32 values:
#         mean spacing 16·d, E max|x| ≈ 2.35 → 8.6% if it were uniform; the entries are
#         denser near zero, where gaussian values are, so it does better; (measured 7.35%)
#   IQ4_XS  IQ4_NL's codebook per 32 values, the 6-bit sub-block scales lose a little;
#         same figure;                                                 (measured 7.4%)
#   BF16  8 significant bits: ≤ 2^-8 per value, ~0.17% rms;              (measured 0.17%)
#   F16   11 significant bits: ~0.02% rms.                              (measured 0.02%)
# The K-quant bounds sit *below* the naive Δ/√12 figure, so they also check that the
# scale search does better than plain range quantization; all leave >5% headroom over
# the measured value (the low-bit types Q2_K, Q3_K, IQ4_NL, IQ4_XS are also compared
# with a plain min-max quantizer below). With 1% outliers at 30σ an outlier sets its
# block's step, so the error grows; those bounds are the measured values plus ~10%.
GAUSSIAN_BOUND = {
    "BF16": 0.0019,
    "F16": 0.00025,
    "Q8_0": 0.0060,
    "Q4_0": 0.095,
    "Q4_K": 0.077,
    "Q5_K": 0.038,
    "Q6_K": 0.0187,
    "Q2_K": 0.285,
    "Q3_K": 0.151,
    "IQ4_NL": 0.078,
    "IQ4_XS": 0.078,
}
OUTLIER_BOUND = {
    "Q8_0": 0.013, "Q4_0": 0.14, "Q4_K": 0.105, "Q5_K": 0.056, "Q6_K": 0.037,
    "Q2_K": 0.225, "Q3_K": 0.13, "IQ4_NL": 0.12, "IQ4_XS": 0.122,
}  # fmt: skip


@pytest.mark.parametrize("ggml_type", sorted(GAUSSIAN_BOUND))
def test_relative_rms_error_on_gaussian_data(ggml_type: str) -> None:
    x = gaussian()
    assert relative_rms(x, roundtrip(x, ggml_type)) < GAUSSIAN_BOUND[ggml_type]


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES)
def test_relative_rms_error_with_outliers(ggml_type: str) -> None:
    x = with_outliers()
    assert relative_rms(x, roundtrip(x, ggml_type)) < OUTLIER_BOUND[ggml_type]


# --- against a plain min-max quantizer ----------------------------------------------------
#
# For the low-bit types the scale search is where the accuracy comes from, so it must beat
# the obvious quantizer of the *same* type: each (sub-)block's scale from its extremes
# alone (Q2_K: range/3 with the min as offset; Q3_K: the signed extreme onto code -4;
# IQ4_*: the signed extreme onto the codebook's -127), stored exactly as the format stores
# it (fp16 super-block scales, 4- or 6-bit sub-block multiples of them) and every value
# rounded against the scale it decodes with. `naive_decoded` computes the values such a
# quantizer's blocks decode to. Measured, gaussian / outliers (ours vs naive):
#   Q2_K   26.9% vs 32.7% / 20.3% vs 26.6%    Q3_K   14.3% vs 15.5% / 11.7% vs 12.0%
#   IQ4_NL 7.35% vs 7.98% / 10.9% vs 11.3%    IQ4_XS 7.41% vs 7.99% / 11.1% vs 11.4%

CODEBOOK = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113.0])


def _signed_extreme(blocks: torch.Tensor) -> torch.Tensor:
    return torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _safe(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


def _nearest_entry(values: torch.Tensor) -> torch.Tensor:
    return CODEBOOK[(values.unsqueeze(-1) - CODEBOOK).abs().argmin(-1)]


def naive_decoded(x: torch.Tensor, ggml_type: str) -> np.ndarray:
    """What a plain min-max quantizer of `ggml_type` decodes `x` to (see above)."""
    if ggml_type == "IQ4_NL":
        blocks = x.reshape(-1, 32)
        d = _fp16(_signed_extreme(blocks) / -127)
        return (_nearest_entry(blocks / _safe(d)) * d).reshape(x.shape).numpy()
    sub_size = 32 if ggml_type == "IQ4_XS" else 16
    sub = x.reshape(-1, 256 // sub_size, sub_size)
    if ggml_type == "Q2_K":
        lo = sub.amin(-1, keepdim=True).clamp_max(0)
        scale, offset = (sub.amax(-1, keepdim=True) - lo) / 3, -lo
        d = _fp16(scale.amax(1, keepdim=True) / 15)
        dmin = _fp16(offset.amax(1, keepdim=True) / 15)
        step = d * (scale / _safe(d)).round().clamp(0, 15)
        floor = dmin * (offset / _safe(dmin)).round().clamp(0, 15)
        codes = ((sub + floor) / _safe(step)).round().clamp(0, 3)
        return (step * codes - floor).reshape(x.shape).numpy()
    top = -4 if ggml_type == "Q3_K" else -127
    scale = _signed_extreme(sub) / top
    d = _fp16(_signed_extreme(scale.squeeze(-1)).unsqueeze(-1) / -32)
    step = d * (scale / _safe(d)).round().clamp(-32, 31)
    if ggml_type == "Q3_K":
        return (step * (sub / _safe(step)).round().clamp(-4, 3)).reshape(x.shape).numpy()
    return (step * _nearest_entry(sub / _safe(step))).reshape(x.shape).numpy()


@pytest.mark.parametrize("data", [gaussian, with_outliers], ids=["gaussian", "outliers"])
@pytest.mark.parametrize("ggml_type", ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_scale_search_beats_a_plain_min_max_quantizer_of_the_same_type(ggml_type: str, data) -> None:
    x = data()
    assert relative_rms(x, roundtrip(x, ggml_type).reshape(x.shape)) < relative_rms(x, naive_decoded(x, ggml_type))


def largest_step(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """Per block, the largest quantization step the block decodes with.

    Q8_0/Q4_0: |d|. Q4_K/Q5_K: d·63 (the largest sub-block scale always maps to 63).
    Q6_K: |d|·128 (the largest sub-block scale always maps to -128). Q2_K: d·15 and
    Q3_K: |d|·32, likewise. IQ4_NL: |d|·24, the widest gap of its codebook (89 → 113);
    IQ4_XS: |d|·32·24, the largest sub-block scale mapping to -32.
    """
    blocks = block_view(data, ggml_type)
    if ggml_type in ("Q8_0", "Q4_0"):
        return np.abs(f16_at(blocks, 0))
    if ggml_type in ("Q4_K", "Q5_K"):
        return f16_at(blocks, 0) * 63
    if ggml_type == "Q2_K":
        return f16_at(blocks, 80) * 15
    if ggml_type == "Q3_K":
        return np.abs(f16_at(blocks, 108)) * 32
    if ggml_type == "IQ4_NL":
        return np.abs(f16_at(blocks, 0)) * 24
    if ggml_type == "IQ4_XS":
        return np.abs(f16_at(blocks, 0)) * 32 * 24
    return np.abs(f16_at(blocks, 208)) * 128


# Max error per block, in units of its largest step:
#   Q8_0: ½ step of rounding, plus fp16 rounding of d (2^-11 relative) times up to 127
#         codes → 0.5 + 0.062 (measured 0.55).
#   Q4_0: the extreme maps to -8 but the opposite side only reaches +7, so a value of
#         the other sign near the extreme is one full step off; plus 8·2^-11 for d.
#   Q4_K/Q5_K: ½ step of rounding; the search may clip the extremes by about one step in
#         exchange for a finer fit of the rest; rounding the sub-block scale and min to
#         6 bits moves the range ends by ≤ levels·d/2 + dmin/2 (about ¼ step each).
#         Together under 2 steps (measured at most 1.5, on all-negative blocks).
#   Q6_K: ½ step of rounding, a little clipping, 8-bit scale rounding (≤ 1/8 step).
#         Under 1 step (measured 0.78).
#   Q2_K: as Q4_K, but the search maps a range onto 2.5 … 4 steps of 3, so it clips up
#         to ~1 step at an end; 4-bit scale and min rounding moves the ends by ≤ ¼ step
#         each. Under 1.5 steps (measured 0.99, on mixed-magnitude blocks).
#   Q3_K: ½ step of rounding; the search maps the extreme onto 3.1 … 4.9 steps of the
#         codes [-4, 3], so clipping can add up to 0.9 step; 6-bit scale rounding ≤ 1/64
#         relative. Under 1.5 steps (measured 1.06).
#   IQ4_NL: nearest entry, so ≤ ½ the widest gap (12·d); the search maps the extreme
#         onto an end of the codebook ±7 entries' worth (7·d), clipping at most that.
#         Under 19/24 of a step plus fp16 rounding: 1 step (measured 0.70).
#   IQ4_XS: the same per sub-block, whose step is at most the largest (measured 0.61).
# These bounds assume d is a normal fp16 number (blocks with max|x| ≳ 1e-2); for tinier
# blocks fp16 subnormals make d itself imprecise — a limit of the formats, not ours.
MAX_ERROR_IN_STEPS = {
    "Q8_0": 0.57, "Q4_0": 1.01, "Q4_K": 2.0, "Q5_K": 2.0, "Q6_K": 1.0,
    "Q2_K": 1.5, "Q3_K": 1.5, "IQ4_NL": 1.0, "IQ4_XS": 1.0,
}  # fmt: skip


@pytest.mark.parametrize("data", [gaussian, with_outliers], ids=["gaussian", "outliers"])
@pytest.mark.parametrize("ggml_type", BLOCK_TYPES)
def test_max_error_per_block_is_bounded_by_its_step(ggml_type: str, data) -> None:
    x = data()
    # Shift some rows to all-positive and all-negative values: the K-quants' min and the
    # asymmetric code range of Q4_0 and Q6_K behave differently on one-sided blocks.
    x[:8] = x[:8].abs() + 0.5
    x[8:16] = -x[8:16].abs() - 0.5
    encoded = quantize(x, ggml_type)
    block_size = gguf.GGML_QUANT_SIZES[Q[ggml_type]][0]
    error = np.abs(gguf_dequantize(encoded, Q[ggml_type]) - x.numpy()).reshape(-1, block_size).max(axis=1)
    assert np.all(error <= MAX_ERROR_IN_STEPS[ggml_type] * largest_step(encoded, ggml_type))


# --- exactness --------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES + FLOAT_TYPES)
def test_all_zero_rows_decode_to_exact_zeros(ggml_type: str) -> None:
    x = gaussian(rows=8)
    x[[0, 3, 7]] = 0.0
    y = roundtrip(x, ggml_type)
    assert np.all(y[[0, 3, 7]] == 0.0)


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q3_K", "Q6_K"])
def test_symmetric_types_keep_zero_values_exact(ggml_type: str) -> None:
    # No offset, so 0 is always a code; every zero must come back as exactly zero.
    x = gaussian(rows=16)
    zeros = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.3
    x[zeros] = 0.0
    assert np.all(roundtrip(x, ggml_type)[zeros.numpy()] == 0.0)


@pytest.mark.parametrize("ggml_type", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"])
def test_zero_sub_block_inside_a_nonzero_super_block_is_exact(ggml_type: str) -> None:
    # A zero sub-block gets scale 0 and min 0, whatever its neighbours hold.
    x = gaussian(rows=4, cols=512)
    x[:, 32:64] = 0.0
    x[:, 320:352] = 0.0
    y = roundtrip(x, ggml_type)
    assert np.all(y[:, 32:64] == 0.0) and np.all(y[:, 320:352] == 0.0)


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES)
def test_constant_rows_are_exact_up_to_fp16_scale_rounding(ggml_type: str) -> None:
    # A constant block is representable exactly by every format (one code, the scale or
    # min chosen to hit it); the only loss is storing d / dmin as fp16 (2^-11 relative).
    # The constants keep d a normal fp16 number (d ≈ |c|/4096 for Q6_K, |c|/945 for
    # Q4_K); below that fp16 subnormals make the stored scale itself coarse.
    constants = torch.tensor([1.0, -1.0, 0.37, -2.5, 0.5, -0.75, 123.0, -40.0])
    x = constants.unsqueeze(1).expand(-1, 512).contiguous()
    y = roundtrip(x, ggml_type)
    assert np.all(np.abs(y - x.numpy()) <= 2.0**-10 * np.abs(x.numpy()))


def test_f32_is_exact() -> None:
    x = with_outliers()
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])
    assert np.array_equal(quantize(x, "F32").view(np.float32).view(np.uint32), x.numpy().view(np.uint32))


@pytest.mark.parametrize("ggml_type, dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_half_types_equal_torch_cast(ggml_type: str, dtype: torch.dtype) -> None:
    x = with_outliers() * 1e-3
    cast = x.to(dtype).view(torch.int16).numpy().view(np.uint8).reshape(x.shape[0], -1)
    assert np.array_equal(quantize(x, ggml_type), cast)


def test_bf16_values_within_half_an_ulp() -> None:
    # 8 significant bits: half an ulp is at most 2^-8 of the value.
    x = gaussian()
    y = roundtrip(x, "BF16")
    assert np.all(np.abs(y - x.numpy()) <= 2.0**-8 * np.abs(x.numpy()))


# --- byte identity with gguf-py -----------------------------------------------------------


def tie_values() -> torch.Tensor:
    """Blocks whose values sit exactly on rounding ties for Q8_0 (d = 1) and Q4_0 (d = -1)."""
    q8 = torch.arange(-15.5, 16.5, 1.0)[:31]
    q8_block = torch.cat([q8, torch.tensor([127.0])])
    q4_block = torch.cat([torch.tensor([-8.0]), torch.linspace(-7.5, 7.5, 31)])
    return torch.stack([q8_block, -q8_block, q4_block, -q4_block]).repeat(1, 2)


@pytest.mark.parametrize("data", [gaussian, with_outliers, tie_values], ids=["gaussian", "outliers", "ties"])
@pytest.mark.parametrize("ggml_type", GGUF_PY_WRITES)
def test_bytes_identical_to_gguf_py(ggml_type: str, data) -> None:
    x = data()
    x[1] = 0.0
    ours = quantize(x, ggml_type)
    theirs = gguf_quantize(x.numpy(), Q[ggml_type])
    assert np.array_equal(ours, theirs.view(np.uint8).reshape(ours.shape))


def test_bf16_nan_payloads_match_gguf_py() -> None:
    # ggml keeps a NaN's sign and top payload bits and sets the quiet bit; torch's own
    # cast would turn every NaN into 0x7FC0.
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FA12345, 0xFFFFFFFF, 0x3F800000], dtype=np.uint32)
    x = torch.from_numpy(bits.view(np.float32).copy()).reshape(1, -1)
    assert np.array_equal(quantize(x, "BF16").reshape(-1), gguf_quantize(x.numpy(), Q.BF16).view(np.uint8).reshape(-1))


# Values are kept away from the degenerate ranges where the reference arithmetic itself
# is undefined: d = max|x|/127 must not underflow (1/d would overflow to inf and the int8
# cast of inf differs between numpy and torch), and fp16 d must not overflow.
finite_block_values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(finite_block_values, min_size=32, max_size=32 * 6).map(lambda v: v[: len(v) // 32 * 32]),
    ggml_type=st.sampled_from(["Q8_0", "Q4_0"]),
)
def test_legacy_bytes_identical_to_gguf_py_for_arbitrary_values(values: list[float], ggml_type: str) -> None:
    x = torch.tensor(values, dtype=torch.float32).reshape(-1, 32)
    amax = x.abs().amax(dim=1)
    assume(bool(torch.all((amax == 0) | (amax > 1e-30))))
    ours = quantize(x, ggml_type)
    theirs = gguf_quantize(x.numpy(), Q[ggml_type])
    assert np.array_equal(ours, theirs.view(np.uint8).reshape(ours.shape))


@settings(max_examples=40, deadline=None)
@given(
    magnitudes=st.lists(st.floats(min_value=-2, max_value=3), min_size=8, max_size=8),
    seed=st.integers(0, 2**31 - 1),
    one_sided=st.sampled_from([None, "positive", "negative"]),
    ggml_type=st.sampled_from(["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]),
)
def test_k_quant_max_error_bound_holds_for_mixed_magnitudes(
    magnitudes: list[float], seed: int, one_sided: str | None, ggml_type: str
) -> None:
    # Eight 32-value sub-blocks of very different magnitude (10^-2 … 10^3) in one
    # super-block: the small ones must share d with the large one.
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed)) * (
        10.0 ** torch.tensor(magnitudes)
    ).unsqueeze(1)
    if one_sided == "positive":
        x = x.abs()
    elif one_sided == "negative":
        x = -x.abs()
    x = x.reshape(1, 256)
    encoded = quantize(x, ggml_type)
    error = np.abs(gguf_dequantize(encoded, Q[ggml_type]) - x.numpy()).max()
    assert error <= MAX_ERROR_IN_STEPS[ggml_type] * largest_step(encoded, ggml_type)[0]


# --- layout, shapes and the GGUF file -------------------------------------------------------


@pytest.mark.parametrize("ggml_type", sorted(QUANTIZABLE_TYPES))
def test_output_is_uint8_bytes_per_row(ggml_type: str) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q[ggml_type]]
    x = gaussian(rows=6, cols=512).reshape(2, 3, 512)
    out = quantize(x, ggml_type)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert out.shape == (2, 3, 512 // block_size * type_size)


def test_gguf_file_round_trip(tmp_path: Path) -> None:
    shapes = {
        "F32": (3, 5),
        "F16": (4, 8),
        "BF16": (2, 3, 4),
        "Q8_0": (5, 64),
        "Q4_0": (2, 32),
        "Q4_K": (3, 2, 512),
        "Q5_K": (256,),
        "Q6_K": (4, 256),
        "Q2_K": (2, 256),
        "Q3_K": (3, 512),
        "IQ4_NL": (3, 96),
        "IQ4_XS": (2, 2, 256),
    }
    assert set(shapes) == QUANTIZABLE_TYPES
    generator = torch.Generator().manual_seed(7)
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    encoded = {name: quantize(x, name) for name, x in tensors.items()}

    path = tmp_path / "quantized.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, data in encoded.items():
        writer.add_tensor(f"t.{name}", data, raw_dtype=Q[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    assert sorted(t.name for t in reader.tensors) == sorted(f"t.{name}" for name in shapes)
    for stored in reader.tensors:
        name = stored.name.removeprefix("t.")
        assert stored.tensor_type == Q[name]
        # GGUF lists dimensions innermost first.
        assert tuple(int(d) for d in stored.shape) == tuple(reversed(shapes[name]))
        assert np.array_equal(np.asarray(stored.data).view(np.uint8).reshape(-1), encoded[name].reshape(-1))
        values = gguf_dequantize(np.asarray(stored.data), Q[name]).reshape(shapes[name])
        assert np.array_equal(values, roundtrip(tensors[name], name).reshape(shapes[name]))


def test_shape_error_names_shape_type_and_block_size() -> None:
    with pytest.raises(QuantizationShapeError) as excinfo:
        quantize(torch.zeros(4, 100), "Q4_K")
    message = str(excinfo.value)
    assert "[4, 100]" in message and "Q4_K" in message and "256" in message
    assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, KtUserError)
    with pytest.raises(QuantizationShapeError):
        quantize(torch.tensor(1.0), "F32")


def test_can_quantize() -> None:
    assert can_quantize((4, 256), "Q4_K")
    assert can_quantize([7, 3, 512], Q.Q6_K)
    assert can_quantize((100,), "F32")
    assert can_quantize((32,), "q8_0")
    assert not can_quantize((4, 100), "Q4_K")
    assert not can_quantize((4, 48), "Q8_0")
    assert not can_quantize((), "F32")
    assert can_quantize((4, 256), "Q2_K") and can_quantize((4, 256), "IQ4_XS")
    assert can_quantize((4, 96), "IQ4_NL") and not can_quantize((4, 96), "IQ4_XS")
    assert not can_quantize((4, 256), "Q5_0")
    assert not can_quantize((4, 256), "not a type")


def test_unsupported_type_is_rejected() -> None:
    with pytest.raises(UnsupportedQuantizationTypeError, match="IQ2_XXS"):
        quantize(torch.zeros(1, 256), "IQ2_XXS")


def test_type_may_be_given_as_enum_or_any_case() -> None:
    x = gaussian(rows=2, cols=256)
    assert np.array_equal(quantize(x, Q.Q5_K), quantize(x, "q5_k"))


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K", "Q6_K"])
def test_non_finite_values_are_refused_with_their_index(ggml_type: str) -> None:
    x = gaussian(rows=3, cols=512).reshape(3, 2, 256)
    x[2, 1, 17] = float("inf")
    with pytest.raises(NonFiniteTensorError, match=r"index \(2, 1, 17\)"):
        quantize(x, ggml_type)


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_layout_and_dtype_of_the_input_do_not_matter(ggml_type: str) -> None:
    x = gaussian(rows=512, cols=256).to(torch.bfloat16)
    reference = quantize(x.float(), ggml_type)
    assert np.array_equal(quantize(x, ggml_type), reference)
    transposed = x.t().contiguous().t()
    assert not transposed.is_contiguous()
    assert np.array_equal(quantize(transposed, ggml_type), reference)
    stacked = x.reshape(4, 128, 256).transpose(0, 1).contiguous().transpose(0, 1)
    assert np.array_equal(quantize(stacked, ggml_type), reference.reshape(4, 128, -1))


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS"])
def test_chunking_does_not_change_the_bytes(ggml_type: str) -> None:
    # 1100 x 256 values span more than one internal chunk; blocks are independent, so
    # quantizing slices must give the same bytes as quantizing the whole.
    x = gaussian(rows=1100, cols=256)
    whole = quantize(x, ggml_type)
    parts = np.concatenate([quantize(x[i : i + 100], ggml_type) for i in range(0, 1100, 100)])
    assert np.array_equal(whole, parts)


def test_torch_thread_setting_is_left_as_found() -> None:
    # Quantizing runs torch single-threaded in a worker pool for the duration only.
    before = torch.get_num_threads()
    quantize(gaussian(rows=2048, cols=256), "Q8_0")
    assert torch.get_num_threads() == before


def test_empty_tensor() -> None:
    assert quantize(torch.zeros(0, 256), "Q4_K").shape == (0, 144)
