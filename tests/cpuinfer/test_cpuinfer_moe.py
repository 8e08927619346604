"""`KExpertsCPU` (the engine's MoE op) against `KExpertsTorch` on the same dequantized weights.

Both backends read one `BlockSource`: the engine computes on its blocks, KExpertsTorch on
gguf-py's dequantization of them, in float32. The tolerance is the propagated bound of
`cpuinfer_refs.moe_reference` (activation quantization in gate/up, through SiLU, and in
down) plus float32 rounding of the torch reference itself.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from cpuinfer_refs import ISAS, BlockSource, dequantize, make_blocks, moe_reference, random_blocks
from transformers import PretrainedConfig

from kt_ops_cpuinfer import _engine, use_isa
from kt_ops_cpuinfer.experts import KExpertsCPU
from kt_ops_torch.experts import KExpertsTorch

KEY = "model.layers.1.mlp.experts"


def moe_config(experts: int, hidden: int, inter: int, act: str = "silu") -> PretrainedConfig:
    return PretrainedConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts, hidden_act=act)


@lru_cache(maxsize=16)
def moe_source(types: tuple[str, str, str], experts: int, hidden: int, inter: int, seed: int, random: bool = False):
    """Stacked expert blocks of the given (gate, up, down) types, and their dequantized values
    (cached: quantizing is the slow part, and sources are read-only)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    shapes = {"gate_proj": (experts, inter, hidden), "up_proj": (experts, inter, hidden), "down_proj": (experts, hidden, inter)}
    tensors, values = {}, {}
    for (name, shape), ggml_type in zip(shapes.items(), types, strict=True):
        if random:
            blocks = random_blocks(shape, ggml_type, rng)
        else:
            blocks = make_blocks(torch.randn(shape, generator=gen) / shape[-1] ** 0.5, ggml_type)
        tensors[f"{KEY}.{name}"] = (ggml_type, shape, blocks)
        values[name] = dequantize(blocks, ggml_type).reshape(shape)
    return BlockSource(tensors), values


def routing(tokens: int, experts: int, top_k: int, seed: int, masked: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    flat = ids.view(-1)
    if masked:
        flat[torch.randperm(flat.numel(), generator=gen)[:masked]] = -1
    return ids, weights


def loaded(cls, source, config, **kwargs):
    backend = cls(KEY, source, config, None, "cpu", **kwargs)
    backend.load()
    return backend


def assert_within_bound(out, torch_out, values, x, ids, weights, formats):
    ref, bound = moe_reference(
        x.double().numpy(), ids.numpy(), weights.double().numpy(), values["gate_proj"], values["up_proj"],
        values["down_proj"], formats,
    )
    torch_err = np.abs(torch_out.double().numpy() - ref)
    assert torch_err.max() <= 1e-4 * (np.abs(ref).max() + 1e-6)  # the reference is float32-accurate
    err = np.abs(out.double().numpy() - torch_out.double().numpy())
    allowed = bound + torch_err + 1e-6 * np.abs(ref).max()
    assert np.all(err <= allowed), f"worst error/bound {float((err / allowed).max()):.3f}"


CASES = [
    ("Q8_0", "Q8_0", "Q8_0"),
    ("Q4_K", "Q4_K", "Q8_0"),  # DeepSeek-V2-Lite's Q4_K_M-style mix: down in a 32-block type
    ("Q5_K", "Q4_K", "Q6_K"),
    ("Q4_0", "Q5_0", "Q4_0"),
    ("BF16", "BF16", "BF16"),
    ("F32", "F16", "F32"),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("types", CASES, ids="-".join)
@pytest.mark.parametrize("tokens", [1, 37])
def test_moe_matches_torch_experts(isa, types, tokens):
    E, H, inter, K = 8, 256, 256, 3
    source, values = moe_source(types, E, H, inter, seed=0)
    config = moe_config(E, H, inter)
    with use_isa(isa):
        cpu = loaded(KExpertsCPU, source, config, threads=2)
    assert cpu.isa == isa and cpu.repacked_bytes == 0
    ref_backend = loaded(KExpertsTorch, source, config, dtype="float32")
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(5))
    ids, weights = routing(tokens, E, K, seed=tokens, masked=tokens // 5)
    out = cpu(x, ids, weights)
    formats = tuple(_engine.activation_format(isa, t) for t in types)
    assert_within_bound(out, ref_backend(x, ids, weights), values, x, ids, weights, formats)


@pytest.mark.parametrize("isa", ISAS)
def test_random_blocks_layer_with_odd_sizes(isa):
    """Random valid blocks, 32-value types with an odd block count (I = 96) and many tokens per expert."""
    E, H, inter, K = 5, 160, 96, 2
    types = ("Q8_0", "Q4_0", "Q5_0")
    source, values = moe_source(types, E, H, inter, seed=11, random=True)
    config = moe_config(E, H, inter)
    with use_isa(isa):
        cpu = loaded(KExpertsCPU, source, config, threads=2)
    x = torch.randn(70, H, generator=torch.Generator().manual_seed(2)) * 0.05
    ids, weights = routing(70, E, K, seed=3, masked=9)
    formats = tuple(_engine.activation_format(isa, t) for t in types)
    out = cpu(x, ids, weights)
    assert_within_bound(out, loaded(KExpertsTorch, source, config, dtype="float32")(x, ids, weights), values, x, ids,
                        weights, formats)


def test_fully_masked_tokens_give_zeros_and_dtype_is_kept():
    E, H, inter = 4, 64, 32
    source, _ = moe_source(("Q8_0", "Q8_0", "Q8_0"), E, H, inter, seed=1)
    cpu = loaded(KExpertsCPU, source, moe_config(E, H, inter))
    x = torch.randn(3, H, dtype=torch.bfloat16)
    ids = torch.tensor([[0, -1], [-1, -1], [3, 7]])  # 7 >= E is masked too
    out = cpu(x, ids, torch.ones(3, 2))
    assert out.dtype == torch.bfloat16 and out.shape == (3, H)
    assert cpu.weight_types == {"gate_proj": "Q8_0", "up_proj": "Q8_0", "down_proj": "Q8_0"}
    assert torch.all(out[1] == 0)
    expected = cpu(x[2:], torch.tensor([[3, -1]]), torch.ones(1, 2))
    torch.testing.assert_close(out[2:], expected, rtol=0, atol=0)


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q8_0"), ("BF16", "BF16", "BF16")], ids="-".join)
def test_thread_counts_give_identical_results(types):
    """Rows are split differently over 1 and 2 threads, but every output is computed by the
    same kernel on the same data in the same order: results are bitwise equal."""
    E, H, inter = 6, 256, 512
    source, _ = moe_source(types, E, H, inter, seed=4)
    config = moe_config(E, H, inter)
    one = loaded(KExpertsCPU, source, config, threads=1)
    two = loaded(KExpertsCPU, source, config, threads=2)
    for tokens in (1, 45):
        x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))
        ids, weights = routing(tokens, E, 3, seed=tokens)
        assert torch.equal(one(x, ids, weights), two(x, ids, weights))


def test_fused_gate_up_source_is_split_without_copy():
    """A source with transformers' fused gate_up_proj [E, 2I, H] (no split names) works as is."""
    E, H, inter = 4, 64, 32
    source, values = moe_source(("F32", "F32", "F32"), E, H, inter, seed=2)
    fused = np.concatenate([values["gate_proj"], values["up_proj"]], axis=1).astype(np.float32)
    fused_source = BlockSource({
        f"{KEY}.gate_up_proj": ("F32", (E, 2 * inter, H), fused.view(np.uint8).reshape(E, 2 * inter, H * 4)),
        f"{KEY}.down_proj": source._get(f"{KEY}.down_proj"),
    })
    config = moe_config(E, H, inter)
    cpu = loaded(KExpertsCPU, fused_source, config)
    assert cpu.repacked_bytes == 0
    x = torch.randn(5, H)
    ids, weights = routing(5, E, 2, seed=1)
    torch.testing.assert_close(cpu(x, ids, weights), loaded(KExpertsCPU, source, config)(x, ids, weights), rtol=0, atol=0)


def test_other_activation_follows_config():
    E, H, inter = 4, 64, 32
    source, _ = moe_source(("F32", "F32", "F32"), E, H, inter, seed=6)
    for act in ("gelu_pytorch_tanh", "relu"):
        config = moe_config(E, H, inter, act=act)
        x = torch.randn(4, H)
        ids, weights = routing(4, E, 2, seed=2)
        cpu = loaded(KExpertsCPU, source, config)(x, ids, weights)
        ref = loaded(KExpertsTorch, source, config, dtype="float32")(x, ids, weights)
        torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_activations_are_read_and_written_as_torch_casts_would(isa, dtype):
    """The layer widens a 16-bit input exactly and rounds its output to nearest even, so a
    bfloat16/float16 call equals the float32 call between `.to(float32)` and `.to(dtype)`, bit
    for bit. H = 600 is not a multiple of the 512-column combine chunks nor of 8 lanes."""
    E, H, inter = 4, 600, 64
    source, _ = moe_source(("F32", "F32", "F32"), E, H, inter, seed=3)  # 600 values: whole blocks of F32 only
    with use_isa(isa):
        cpu = loaded(KExpertsCPU, source, moe_config(E, H, inter))
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(4)).to(dtype)
    ids, weights = routing(5, E, 2, seed=5, masked=1)
    out = cpu(x, ids, weights)
    assert out.dtype == dtype
    assert torch.equal(out, cpu(x.float(), ids, weights).to(dtype))
