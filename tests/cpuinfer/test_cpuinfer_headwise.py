"""`KHeadwiseLinearCPUInfer` and the engine's grouped `Linear` it runs on (MLA's per-head products)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpuinfer_refs import (
    ISAS,
    BlockSource,
    block_size,
    dequantize,
    make_blocks,
    matmul_bound,
    own_memory,
    type_size,
)
from transformers import PretrainedConfig

from kt_core.backends import BackendMemory
from kt_core.weights.source import StateDictSource
from kt_ops_cpuinfer import _engine, use_isa
from kt_ops_cpuinfer.headwise import KHeadwiseLinearCPUInfer
from kt_ops_cpuinfer.pool import get_pool

KEY = "model.layers.0.self_attn.kv_b_proj.k_b"


def _row_bytes(ggml_type: str, cols: int) -> int:
    return cols // block_size(ggml_type) * type_size(ggml_type)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K", "BF16", "F32"])
def test_grouped_linear_equals_one_linear_per_group(isa, ggml_type):
    """Group g of one grouped call is exactly a plain call on matrix g with input slice g.

    Both run the same kernels on the same quantized activation rows, so the results must
    be identical bit for bit: any difference is an indexing error in the grouping (a
    wrong input slice, output column or weight group), never rounding.
    """
    heads, rows, cols, tokens = 5, 40, 256, 3
    gen = torch.Generator().manual_seed(1)
    blocks = np.ascontiguousarray(make_blocks(torch.randn(heads * rows, cols, generator=gen), ggml_type))
    flat = blocks.reshape(-1)
    row_bytes = _row_bytes(ggml_type, cols)
    group_bytes = rows * row_bytes
    pool = get_pool(2)
    grouped = _engine.Linear(pool, isa, (flat.ctypes.data, ggml_type, rows, cols, row_bytes, group_bytes), groups=heads)
    assert grouped.groups == heads
    x = torch.randn(tokens, heads, cols, generator=gen)
    out = torch.empty(tokens, heads * rows)
    grouped.forward(x.reshape(tokens, -1).contiguous().data_ptr(), tokens, out.data_ptr(), 0)
    for g in range(heads):
        single = _engine.Linear(pool, isa, (flat.ctypes.data + g * group_bytes, ggml_type, rows, cols, row_bytes, 0))
        xg = x[:, g].contiguous()
        og = torch.empty(tokens, rows)
        single.forward(xg.data_ptr(), tokens, og.data_ptr(), 0)
        assert torch.equal(out[:, g * rows:(g + 1) * rows], og), f"group {g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K", "F32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [1, 3])
def test_linear_reads_and_writes_16_bit_rows_as_torch_casts_would(isa, ggml_type, dtype, groups):
    """A 16-bit input is widened exactly and the output rounded to nearest even, so the call
    equals the float32 call between `.to(float32)` and `.to(dtype)`, bit for bit (the bias,
    float32, is added before the rounding)."""
    rows, cols, tokens = 37, 256, 3  # 37 rows: the 8-lane rounding loop's tail runs too
    gen = torch.Generator().manual_seed(2)
    blocks = np.ascontiguousarray(make_blocks(torch.randn(groups * rows, cols, generator=gen), ggml_type))
    row_bytes = _row_bytes(ggml_type, cols)
    op = _engine.Linear(get_pool(2), isa, (blocks.reshape(-1).ctypes.data, ggml_type, rows, cols, row_bytes, rows * row_bytes),
                        groups=groups)
    x = torch.randn(tokens, groups * cols, generator=gen).to(dtype)
    bias = torch.randn(rows, generator=gen) if groups == 1 else None
    bias_ptr = bias.data_ptr() if bias is not None else 0
    name = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    out = torch.empty(tokens, groups * rows, dtype=dtype)
    op.forward(x.data_ptr(), tokens, out.data_ptr(), bias_ptr, name, name)
    wide, x32 = torch.empty(tokens, groups * rows), x.float()
    op.forward(x32.data_ptr(), tokens, wide.data_ptr(), bias_ptr)
    assert torch.equal(out, wide.to(dtype))
    widened_only = torch.empty(tokens, groups * rows)
    op.forward(x.data_ptr(), tokens, widened_only.data_ptr(), bias_ptr, name, "F32")
    assert torch.equal(widened_only, wide)
    with pytest.raises(ValueError, match="expected a float type"):
        op.forward(x.data_ptr(), tokens, out.data_ptr(), bias_ptr, "Q8_0", name)


def test_grouped_linear_refuses_a_bias():
    weight = torch.randn(2 * 8, 32)
    op = _engine.Linear(get_pool(2), "avx2", (weight.data_ptr(), "F32", 8, 32, 32 * 4, 8 * 32 * 4), groups=2)
    x, out, bias = torch.randn(1, 64), torch.empty(1, 16), torch.zeros(8)
    with pytest.raises(ValueError, match="bias needs a single group"):
        op.forward(x.data_ptr(), 1, out.data_ptr(), bias.data_ptr())


def _backend(source, heads: int, out_f: int, in_f: int, isa: str | None = None, **kwargs) -> KHeadwiseLinearCPUInfer:
    backend = KHeadwiseLinearCPUInfer(
        KEY, source, PretrainedConfig(), None, "cpu", threads=2, heads=heads, out_features=out_f, in_features=in_f, **kwargs
    )
    if isa is None:
        backend.load()
    else:
        with use_isa(isa):
            backend.load()
    return backend


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K"])
def test_stored_halves_are_used_in_place_and_match_the_per_head_reference(isa, ggml_type):
    heads, out_f, in_f = 4, 48, 256
    gen = torch.Generator().manual_seed(2)
    blocks = make_blocks(torch.randn(heads * out_f, in_f, generator=gen), ggml_type)
    source = BlockSource({KEY: (ggml_type, (heads, out_f, in_f), blocks)})
    backend = _backend(source, heads, out_f, in_f, isa)
    assert backend.weight_type == ggml_type
    assert own_memory(backend) == BackendMemory(mapped=blocks.nbytes)  # the stored blocks, no copy
    x = torch.randn(2, 3, heads, in_f, generator=gen)
    y = backend(x)
    assert y.shape == (2, 3, heads, out_f) and y.dtype == torch.float32
    w = dequantize(blocks, ggml_type).reshape(heads, out_f, in_f)
    fmt = _engine.activation_format(isa, ggml_type)
    for h in range(heads):
        rows = x[:, :, h].reshape(-1, in_f).double().numpy()
        ref = rows @ w[h].T
        # Per head, the bound of the plain linear tests: the activations' quantization error
        # (1/254 of a block's largest for the int8 formats) through |W|, plus float rounding.
        bound = matmul_bound(rows, w[h], fmt) + 1e-6
        assert np.all(np.abs(y[:, :, h].reshape(-1, out_f).double().numpy() - ref) <= bound), f"head {h}"


def test_a_source_without_the_halves_uses_the_fallback_as_a_counted_copy():
    """A fused kv_b_proj (or a safetensors checkpoint) has no stored halves: the operator's
    fallback builds them, the engine computes on that float32 copy (F32 activations, so the
    result is float32-exact up to summation order), and it is reported as repacked memory."""
    heads, out_f, in_f = 3, 16, 64
    weight = torch.randn(heads, out_f, in_f)
    asked = []

    def fallback(dtype):
        asked.append(dtype)
        return weight.to(torch.bfloat16)

    backend = _backend(StateDictSource({}), heads, out_f, in_f, fallback=fallback)
    assert asked == [torch.float32] and backend.weight_type == "F32"
    assert own_memory(backend) == BackendMemory(repacked=heads * out_f * in_f * 4)
    x = torch.randn(5, heads, in_f)
    expected = torch.einsum("thi,hoi->tho", x, weight.to(torch.bfloat16).float())
    torch.testing.assert_close(backend(x), expected, rtol=1e-5, atol=1e-5)


def test_shape_and_type_problems_are_reported():
    heads, out_f, in_f = 2, 8, 256
    source = BlockSource({KEY: ("Q8_0", (heads, out_f, in_f), make_blocks(torch.randn(heads * out_f, in_f), "Q8_0"))})
    with pytest.raises(ValueError, match=r"has shape \(2, 8, 256\), expected \(2, 16, 256\)"):
        _backend(source, heads, 16, in_f)
    backend = _backend(source, heads, out_f, in_f)
    with pytest.raises(ValueError, match=r"input ends in \(2, 128\), expected \(2, 256\)"):
        backend(torch.randn(1, heads, 128))
    missing = KHeadwiseLinearCPUInfer(KEY, StateDictSource({}), PretrainedConfig(), None, "cpu",
                                      heads=heads, out_features=out_f, in_features=in_f)
    with pytest.raises(ValueError, match="has no tensor .*k_b and KHeadwiseLinearCPUInfer was given no fallback"):
        missing.load()
    iq = BlockSource({KEY: ("IQ4_NL", (heads, out_f, in_f), np.zeros((heads * out_f, in_f // 32 * 18), np.uint8))})
    unsupported = KHeadwiseLinearCPUInfer(KEY, iq, PretrainedConfig(), None, "cpu",
                                          heads=heads, out_features=out_f, in_features=in_f)
    (problem,) = unsupported.check_weights()
    assert "is stored as IQ4_NL, which KHeadwiseLinearCPUInfer cannot compute on" in problem
    assert problem.endswith("or no absorb_op in the attention's rule (torch's matmuls on dequantized halves)")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float32])
# 16 heads: whole blocks of query rows; 7 heads and 500 columns: the 4-row and 1-row blocks
# (21 rows) and the columns past the last full vector.
@pytest.mark.parametrize("heads, latent", [(16, 512), (7, 500)])
# 64 rotary values: four whole vectors added to the latent part's chains; 12: a part that is
# all tail (no whole vector), summed beside the chains.
@pytest.mark.parametrize("rope", [64, 12])
def test_latent_attention_matches_torch_on_the_stored_cache(isa, cache_dtype, heads, latent, rope):
    """scores = q_latent·c_kv + q_pe·k_pe, softmax over each query's visible prefix, · c_kv.

    The reference widens the cache to float32 exactly as the kernel does in registers, and
    both accumulate in float32, so they differ only by summation order: a few ulps of the
    ~1-sized results (atol 2e-5 over 150 keys and 512 columns)."""
    queries, keys = 3, 150
    gen = torch.Generator().manual_seed(6)
    q_latent = torch.randn(queries, heads, latent, generator=gen)
    q_pe = torch.randn(queries, heads, rope, generator=gen)
    # A slice of a longer cache (unwritten slots after `keys`), rows strided by the full width.
    c_kv = torch.randn(keys + 10, latent + rope, generator=gen).to(cache_dtype)[:keys]
    c_latent, k_pe = c_kv[:, :latent], c_kv[:, latent:]
    visible = torch.tensor([keys - 2, 1, keys], dtype=torch.int32)
    source = BlockSource({KEY: ("F32", (heads, 8, 32), np.zeros((heads * 8, 32 * 4), np.uint8))})
    with use_isa(isa):
        backend = _backend(source, heads, 8, 32)
    scale = 0.07
    out = backend.latent_attention(q_latent, q_pe, c_latent, k_pe, visible, scale)
    scores = (q_latent @ c_latent.float().T + q_pe @ k_pe.float().T) * scale
    mask = torch.arange(keys)[None, None, :] < visible[:, None, None]
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ c_latent.float()
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
    # A cache the kernel cannot read row by row is left to torch.
    assert backend.latent_attention(q_latent, q_pe, c_latent.float().T.contiguous().T, k_pe, visible, scale) is None
    with pytest.raises(ValueError, match="visible keys out of range"):
        backend.latent_attention(q_latent, q_pe, c_latent, k_pe, torch.tensor([1, 2, keys + 1]), scale)
