"""Each kernel of each ISA path against gguf-py's dequantize + a float64 matmul.

Tolerances are the derived bounds of `cpuinfer_refs` (activation quantization to 8 bits
per block, bfloat16 rounding, float32 accumulation). Shapes cover the kernels' edges: row
counts that are not multiples of anything, 1 to 19 tokens (token groups of 4 for Q4_0/Q5_0
and 8 for the Q8_0 and K-quant kernels of both paths, and every remainder size of both), 19 Q8_0 blocks
per row (two of the AVX-512 kernel's eight-block steps and a three-block tail), an odd
number of 32-value blocks (the single-block tail), float rows with a scalar tail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpuinfer_refs import (
    FLOAT_TYPES,
    ISAS,
    QUANT_TYPES,
    block_size,
    dequantize,
    engine_gemm,
    make_blocks,
    matmul_bound,
    random_blocks,
)

from kt_ops_cpuinfer import _engine

COLS = {"F32": 100, "F16": 72, "BF16": 136, "Q4_0": 96, "Q5_0": 160, "Q8_0": 608, "Q4_K": 512, "Q5_K": 768, "Q6_K": 512}
ROWS = 13


def _check(isa: str, ggml_type: str, blocks: np.ndarray, x: np.ndarray) -> float:
    w = dequantize(blocks, ggml_type).reshape(ROWS, -1)
    out = engine_gemm(isa, ggml_type, blocks, x)
    ref = x.astype(np.float64) @ w.T
    bound = matmul_bound(x, w, _engine.activation_format(isa, ggml_type))
    err = np.abs(out - ref)
    assert np.all(err <= bound), f"{isa} {ggml_type}: worst error/bound {float((err / bound).max()):.3f}"
    return float((err / np.maximum(bound, 1e-30)).max())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", FLOAT_TYPES + QUANT_TYPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 6, 7, 8, 13, 19])
def test_quantized_weights_match_gguf_reference(isa, ggml_type, tokens):
    gen = torch.Generator().manual_seed(tokens)
    cols = COLS[ggml_type]
    w = torch.randn(ROWS, cols, generator=gen) * 0.5
    x = (torch.randn(tokens, cols, generator=gen) * 2.0).numpy()
    _check(isa, ggml_type, make_blocks(w, ggml_type), x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", FLOAT_TYPES + QUANT_TYPES)
def test_random_valid_blocks_match_gguf_reference(isa, ggml_type):
    rng = np.random.default_rng(7)
    cols = COLS[ggml_type]
    blocks = random_blocks((ROWS, cols), ggml_type, rng)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    x[1, : cols // 2] *= 100.0  # blocks of very different magnitude in one row
    x[2, :] = 0.0  # all-zero activation blocks (scale 0)
    _check(isa, ggml_type, blocks, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
def test_matches_emulated_activation_quantization_tightly(isa, ggml_type):
    """Beyond the bound: with x quantized in numpy exactly as the engine does it, the engine
    equals dequantize(W) @ dequantize(q(x)) up to float32 accumulation, so a wrong scale,
    offset or bit position anywhere would show."""
    rng = np.random.default_rng(3)
    cols = COLS[ggml_type]
    blocks = random_blocks((ROWS, cols), ggml_type, rng)
    w = dequantize(blocks, ggml_type).reshape(ROWS, cols)
    x = rng.standard_normal((6, cols)).astype(np.float32)
    bs = 32 if block_size(ggml_type) == 32 else 256
    xb = x.reshape(6, -1, bs)
    amax = np.abs(xb).max(-1, keepdims=True)
    scale = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = (np.rint(xb * scale) * (amax / np.float32(127)).astype(np.float32)).reshape(x.shape)
    ref = xq.astype(np.float64) @ w.T
    out = engine_gemm(isa, ggml_type, blocks, x)
    scale_ref = np.abs(xq) @ np.abs(w).T
    assert np.all(np.abs(out - ref) <= (cols + 8) * 2.0**-23 * scale_ref + 1e-30)


@pytest.mark.parametrize("isa", ISAS)
def test_activation_rows_have_the_documented_layout(isa):
    """Q8_256 rows: codes, one scale per 256, and sums of each 16 codes (used for K-quant minimums)."""
    rng = np.random.default_rng(0)
    n = 512
    x = rng.standard_normal(n).astype(np.float32)
    buf = np.zeros(_engine.activation_row_bytes("Q8_256", n), dtype=np.uint8)
    _engine.quantize_row(isa, "Q8_256", x.ctypes.data, n, buf.ctypes.data)
    q = buf[:n].view(np.int8).astype(np.int64)
    d = buf[n:n + 8].view(np.float32)
    bsums = buf[n + 8:n + 8 + 64].view(np.int16)
    assert np.array_equal(bsums, q.reshape(-1, 16).sum(-1))
    np.testing.assert_allclose(d, np.abs(x.reshape(2, 256)).max(-1) / 127, rtol=1e-7)
    assert np.all(np.abs(q.reshape(2, 256) * d[:, None] - x.reshape(2, 256)) <= d[:, None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fn", ["silu", "relu", "gelu", "gelu_pytorch_tanh"])
def test_activation_functions_match_torch(isa, fn):
    from transformers.activations import ACT2FN

    g = torch.linspace(-30, 30, 1003)
    u = torch.randn(1003, generator=torch.Generator().manual_seed(1))
    h = torch.empty(1003)
    _engine.activate(isa, fn, g.data_ptr(), u.data_ptr(), h.data_ptr(), 1003)
    expected = (ACT2FN[fn](g.double()) * u.double()).float()
    torch.testing.assert_close(h, expected, rtol=2e-6, atol=1e-7)


def test_unknown_activation_and_type_are_rejected():
    with pytest.raises(ValueError, match="no activation 'tanh'"):
        _engine.check_activation("tanh")
    with pytest.raises(ValueError, match="cannot compute on GGML type 'Q3_K'"):
        _engine.activation_format(ISAS[0], "Q3_K")
