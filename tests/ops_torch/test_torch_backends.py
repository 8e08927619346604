"""KLinearTorch and KExpertsTorch against the torch/transformers modules they replace.

Tolerances: float32 weights and activations on both sides. The linear backend does the
same single matmul as nn.Linear, so results are bit-identical. The experts backend sums
the k expert outputs of a token in a different order than transformers (grouped by
expert, then index_add), so float32 rounding differs by a few ulps: atol 1e-6 on outputs
of magnitude ~1e-2 is ~100 ulps of headroom and still catches any real mistake (a wrong
expert or weight changes outputs by >1e-3).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import deepseek_v2_config, qwen3_moe_config, random_model
from torch import nn

from kt_core import cpu_matmul
from kt_core.weights.source import StateDictSource
from kt_ops_torch.experts import KExpertsTorch
from kt_ops_torch.linear import KLinearTorch


@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_nn_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(48, 24, bias=bias)
    source = StateDictSource({f"l.{k}": v for k, v in ref.state_dict().items()})
    with torch.device("meta"):
        meta = nn.Linear(48, 24, bias=bias)
    op = KLinearTorch("l", source, deepseek_v2_config(), meta)
    op.load()
    x = torch.randn(5, 7, 48)
    assert torch.equal(op(x), ref(x))


def test_linear_on_one_row_never_copies_the_weight():
    """The logits of a prefill come from ``hidden[:, -1:]``, a [1, 1, H] tensor; torch's
    matmul multiplies such a 3-D input of one row as a bmm against a copied [1, in, out]
    weight (420 MB per call for DeepSeek's lm_head). The backend multiplies rows as one
    2-D matrix instead."""
    from torch.profiler import ProfilerActivity, profile

    ref = nn.Linear(256, 1024, bias=False, dtype=torch.bfloat16)  # the slow path is bfloat16's
    op = KLinearTorch("l", StateDictSource({"l.weight": ref.weight.detach()}), deepseek_v2_config(), ref,
                      dtype="bfloat16")
    op.load()
    hidden = torch.randn(1, 6, 256, dtype=torch.bfloat16)
    last = hidden[:, -1:]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = op(last)
    copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone") and 256 * 1024 in
              [int(torch.tensor(s).prod()) for s in e.input_shapes if s]]
    assert not copies, [(e.name, e.input_shapes) for e in copies]
    torch.testing.assert_close(out, ref(last), rtol=0, atol=0)  # same bf16 kernel, same order


def test_linear_bfloat16_dtype_computes_in_bf16_and_returns_input_dtype():
    ref = nn.Linear(32, 16)
    source = StateDictSource({f"l.{k}": v for k, v in ref.state_dict().items()})
    op = KLinearTorch("l", source, deepseek_v2_config(), nn.Linear(32, 16), dtype="bfloat16")
    op.load()
    x = torch.randn(3, 32)
    out = op(x)
    assert op.weight.dtype == torch.bfloat16 and out.dtype == torch.float32
    # bf16 has 8 mantissa bits: relative error ~2^-8 per operand.
    torch.testing.assert_close(out, ref(x), rtol=0.03, atol=0.03)


def test_linear_rejects_wrong_shape():
    source = StateDictSource({"l.weight": torch.zeros(3, 3)})
    op = KLinearTorch("l", source, deepseek_v2_config(), nn.Linear(4, 3, bias=False))
    with pytest.raises(ValueError, match=r"l.weight has shape \(3, 3\), expected \(3, 4\)"):
        op.load()


@pytest.mark.parametrize("make_config", [deepseek_v2_config, qwen3_moe_config])
@pytest.mark.parametrize("num_tokens", [1, 17])
def test_experts_match_transformers_experts(make_config, num_tokens):
    config = make_config()
    model = random_model(config)
    experts = model.model.layers[1].mlp.experts
    key = "model.layers.1.mlp.experts"
    source = StateDictSource({f"{key}.{k}": v for k, v in experts.state_dict().items()})
    op = KExpertsTorch(key, source, config, experts)
    op.load()
    torch.manual_seed(1)
    hidden = torch.randn(num_tokens, config.hidden_size)
    k = config.num_experts_per_tok
    ids = torch.stack([torch.randperm(experts.num_experts)[:k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, k)
    with torch.no_grad():
        expected = experts(hidden, ids, weights)
        got = op(hidden, ids, weights)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_experts_submit_sync_and_split_weight_names():
    config = deepseek_v2_config()
    model = random_model(config)
    experts = model.model.layers[1].mlp.experts
    key = "e"
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    source = StateDictSource({"e.gate_proj": gate, "e.up_proj": up, "e.down_proj": experts.down_proj.detach()})
    op = KExpertsTorch(key, source, config, experts)
    op.load()
    hidden = torch.randn(4, config.hidden_size)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 3, 5]])
    weights = torch.rand(4, 3)
    op.submit(hidden, ids, weights)
    with torch.no_grad():
        torch.testing.assert_close(op.sync(), experts(hidden, ids, weights), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="without a submit"):
        op.sync()


def test_experts_ignore_masked_slots():
    config = deepseek_v2_config()
    experts = random_model(config).model.layers[1].mlp.experts
    source = StateDictSource({f"e.{k}": v for k, v in experts.state_dict().items()})
    op = KExpertsTorch("e", source, config, experts)
    op.load()
    hidden = torch.randn(2, config.hidden_size)
    ids = torch.tensor([[0, 8, 2], [-1, 4, 5]])  # 8 == num_experts and -1 mark unused slots
    weights = torch.rand(2, 3)
    kept = op(hidden, ids, weights)
    ids_clean = torch.tensor([[0, 2, 2], [4, 4, 5]])
    w_clean = weights.clone()
    w_clean[0, 1] = 0
    w_clean[1, 0] = 0
    torch.testing.assert_close(kept, op(hidden, ids_clean, w_clean), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("features", "rows", "computes_in"), [
    ((), 20, torch.float32),  # a prefill on a CPU without bfloat16 dot products: float32
    ((), 3, torch.bfloat16),  # a few rows: converting the weight would cost more than it saves
    (("amx_bf16",), 20, torch.bfloat16),  # bfloat16 dot products: the weight's own dtype
])
def test_linear_bfloat16_prefill_computes_where_the_cpu_is_fast(features, rows, computes_in, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_cpu_capabilities", lambda: frozenset(features))
    ref = nn.Linear(64, 32)
    source = StateDictSource({f"l.{k}": v for k, v in ref.state_dict().items()})
    op = KLinearTorch("l", source, deepseek_v2_config(), nn.Linear(64, 32), dtype="bfloat16")
    op.load()
    x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
    expected = F.linear(x.to(computes_in), op.weight.to(computes_in), op.bias.to(computes_in)).to(torch.bfloat16)
    assert op.weight.dtype == torch.bfloat16
    assert torch.equal(op(x), expected)  # the same single matmul in the same dtype: bit-identical


def test_experts_with_a_prefill_s_tokens_compute_in_float32_without_bf16_dot_products(monkeypatch):
    """On a CPU without bfloat16 dot products an expert given >= UPCAST_MIN_ROWS tokens runs
    on a float32 copy of its weights; one given fewer on the stored bfloat16. Tolerance:
    bfloat16 weights and outputs (8 mantissa bits) on outputs of magnitude ~1e-2."""
    import kt_ops_torch.experts as experts_module

    monkeypatch.setattr(cpu_matmul, "_cpu_capabilities", lambda: frozenset())
    seen: list[tuple[int, torch.dtype]] = []

    def spy(weight, rows):
        chosen = cpu_matmul.matmul_weight(weight, rows)
        seen.append((rows, chosen.dtype))
        return chosen

    monkeypatch.setattr(experts_module, "matmul_weight", spy)
    config = deepseek_v2_config()
    experts = random_model(config).model.layers[1].mlp.experts
    source = StateDictSource({f"e.{k}": v for k, v in experts.state_dict().items()})
    op = KExpertsTorch("e", source, config, experts, dtype="bfloat16")
    op.load()
    tokens = cpu_matmul.UPCAST_MIN_ROWS + 2
    hidden = torch.randn(tokens, config.hidden_size)
    ids = torch.tensor([[0, 1, 2 + t % 5] for t in range(tokens)])  # experts 0 and 1 get every token
    weights = torch.rand(tokens, 3)
    with torch.no_grad():
        got = op(hidden, ids, weights)
        expected = experts(hidden, ids, weights)
    assert {dtype for rows, dtype in seen if rows >= cpu_matmul.UPCAST_MIN_ROWS} == {torch.float32}
    assert {dtype for rows, dtype in seen if rows < cpu_matmul.UPCAST_MIN_ROWS} == {torch.bfloat16}
    torch.testing.assert_close(got, expected, rtol=0.05, atol=2e-3)
