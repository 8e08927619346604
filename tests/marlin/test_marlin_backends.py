"""`KLinearMarlin` / `KExpertsMarlin` on the CPU path against the PyTorch backends holding
the same int4 weights dequantized to float32, plus registration, kwargs and load checks.

Tolerances: both sides compute in float32 on identical weight values (``q·s``); the int4
kernel dequantizes inside its own loop and sums in another order, so outputs differ by
float32 rounding only. atol 1e-5 on outputs of magnitude ~1 (linear) and 1e-6 on expert
outputs of magnitude ~1e-2 (the scale of `KExpertsTorch`'s own test) leave ~100 ulps of
headroom; a wrong group, scale or expert changes outputs by > 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import deepseek_v2_config, qwen3_moe_config, random_model
from torch import nn

from kt_core.registry import OperatorKind
from kt_core.rules.diagnostics import RuleFileError
from kt_core.weights.source import StateDictSource
from kt_ops_marlin import device_paths
from kt_ops_marlin.experts import KExpertsMarlin
from kt_ops_marlin.int4 import quantize_int4
from kt_ops_marlin.linear import KLinearMarlin
from kt_ops_torch.experts import KExpertsTorch
from kt_ops_torch.linear import KLinearTorch


def _int4_round_trip(tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    return quantize_int4(tensor, group_size, torch.float32).dequantize()


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch_backend_on_int4_weights(group_size, bias):
    torch.manual_seed(0)
    ref = nn.Linear(128, 40, bias=bias)
    state = {f"l.{k}": v.detach() for k, v in ref.state_dict().items()}
    dequantized = {**state, "l.weight": _int4_round_trip(state["l.weight"], group_size)}
    marlin = KLinearMarlin("l", StateDictSource(state), deepseek_v2_config(), ref, group_size=group_size)
    torch_op = KLinearTorch("l", StateDictSource(dequantized), deepseek_v2_config(), ref, dtype="float32")
    marlin.load()
    torch_op.load()
    x = torch.randn(2, 7, 128)
    got = marlin(x)
    assert got.shape == (2, 7, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch_op(x), rtol=0, atol=1e-5)
    assert not torch.allclose(got, ref(x).detach(), atol=1e-3)  # it really is int4, not the float weight


def test_linear_bfloat16_computes_in_bf16_and_returns_the_input_dtype():
    torch.manual_seed(1)
    ref = nn.Linear(64, 32)
    state = {f"l.{k}": v.detach() for k, v in ref.state_dict().items()}
    op = KLinearMarlin("l", StateDictSource(state), deepseek_v2_config(), ref, group_size=32, dtype="bfloat16")
    op.load()
    x = torch.randn(3, 64)
    out = op(x)
    assert out.dtype == torch.float32 and op.int4.dtype == torch.bfloat16
    qw = quantize_int4(state["l.weight"], 32, torch.bfloat16)
    expected = x.bfloat16().float() @ qw.dequantize().t() + state["l.bias"].bfloat16().float()
    # bf16 output rounding (2^-9 relative) twice: the matmul and the bias add.
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=1e-2)


def test_linear_reports_k_not_divisible_before_loading():
    meta = nn.Linear(96, 16, bias=False, device="meta")
    op = KLinearMarlin("model.layers.0.mlp.down_proj", StateDictSource({}), deepseek_v2_config(), meta, group_size=64)
    problems = op.check_weights()
    assert len(problems) == 1
    assert "model.layers.0.mlp.down_proj.weight" in problems[0] and "K=96" in problems[0] and "group_size=64" in problems[0]
    with pytest.raises(ValueError, match="K=96 is not divisible by group_size=64"):
        op.load()


def test_group_size_is_validated_at_construction():
    with pytest.raises(ValueError, match="positive multiple of 32"):
        KLinearMarlin("l", None, deepseek_v2_config(), nn.Linear(64, 16, device="meta"), group_size=16)


def test_cuda_without_triton_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(device_paths, "triton_available", lambda: False)
    op = KLinearMarlin("l", StateDictSource({}), deepseek_v2_config(), nn.Linear(64, 16, device="meta"), device="cuda",
                       group_size=32)
    (problem,) = op.check_weights()
    assert "l: KLinearMarlin on cuda" in problem and "needs triton" in problem and "pip install" in problem
    with pytest.raises(RuntimeError, match="needs triton"):
        device_paths.prepare_int4(torch.randn(16, 64), 32, torch.float16, "cuda")


def test_compute_path_names_the_kernel_per_device():
    assert KLinearMarlin.compute_path("cpu") == "int4, CPU path"
    assert KExpertsMarlin.compute_path("cuda:1") == "int4, Triton kernel"
    assert "unsupported" in KLinearMarlin.compute_path("meta")


def _experts_case(make_config):
    config = make_config()
    experts = random_model(config).model.layers[1].mlp.experts
    return config, experts


@pytest.mark.parametrize("make_config", [deepseek_v2_config, qwen3_moe_config])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("num_tokens", [1, 17])
def test_experts_match_torch_backend_on_int4_weights(make_config, group_size, num_tokens):
    config, experts = _experts_case(make_config)
    state = {f"e.{k}": v.detach() for k, v in experts.state_dict().items()}  # fused gate_up_proj, as transformers holds it
    dequantized = {k: _int4_round_trip(v, group_size) for k, v in state.items()}
    marlin = KExpertsMarlin("e", StateDictSource(state), config, experts, group_size=group_size)
    torch_op = KExpertsTorch("e", StateDictSource(dequantized), config, experts, dtype="float32")
    assert marlin.check_weights() == []
    marlin.load()
    torch_op.load()
    torch.manual_seed(2)
    hidden = torch.randn(num_tokens, config.hidden_size)
    k = config.num_experts_per_tok
    ids = torch.stack([torch.randperm(experts.num_experts)[:k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, k)
    torch.testing.assert_close(marlin(hidden, ids, weights), torch_op(hidden, ids, weights), rtol=0, atol=1e-6)


def test_experts_split_names_give_the_fused_result_and_submit_sync_works():
    config, experts = _experts_case(deepseek_v2_config)
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    split = StateDictSource({"e.gate_proj": gate, "e.up_proj": up, "e.down_proj": experts.down_proj.detach()})
    fused = StateDictSource({f"e.{k}": v.detach() for k, v in experts.state_dict().items()})
    a = KExpertsMarlin("e", split, config, experts, group_size=32)
    b = KExpertsMarlin("e", fused, config, experts, group_size=32)
    a.load()
    b.load()
    hidden = torch.randn(5, config.hidden_size)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 3, 5], [2, 2, 7]])
    weights = torch.rand(5, 3)
    a.submit(hidden, ids, weights)
    assert torch.equal(a.sync(), b(hidden, ids, weights))


def test_experts_ignore_masked_slots():
    config, experts = _experts_case(deepseek_v2_config)
    op = KExpertsMarlin("e", StateDictSource({f"e.{k}": v.detach() for k, v in experts.state_dict().items()}),
                        config, experts, group_size=32)
    op.load()
    hidden = torch.randn(2, config.hidden_size)
    ids = torch.tensor([[0, 8, 2], [-1, 4, 5]])  # 8 == num_experts and -1 mark unused slots
    weights = torch.rand(2, 3)
    clean_w = weights.clone()
    clean_w[0, 1] = clean_w[1, 0] = 0
    torch.testing.assert_close(op(hidden, ids, weights), op(hidden, torch.tensor([[0, 2, 2], [4, 4, 5]]), clean_w),
                               rtol=0, atol=1e-6)


def test_experts_report_every_projection_that_does_not_fit():
    config, experts = _experts_case(deepseek_v2_config)  # hidden 64, moe_intermediate 32
    op = KExpertsMarlin("model.layers.1.mlp.experts", StateDictSource({}), config, experts, group_size=64)
    (problem,) = op.check_weights()
    assert problem.startswith("model.layers.1.mlp.experts.down_proj: in_features K=32")
    with pytest.raises(ValueError, match="down_proj: in_features K=32 is not divisible by group_size=64"):
        op.load()


def test_registered_with_ktransformers_aliases(registry):
    linear = registry.resolve_operator("KLinearMarlin", kind=OperatorKind.LINEAR_BACKEND)
    experts = registry.resolve_operator("KExpertsMarlin", kind=OperatorKind.EXPERTS_BACKEND)
    for alias in ("ktransformers.operators.linear.KLinearMarlin", "QuantizedLinearMarlin"):
        assert registry.resolve_operator(alias) is linear
    for alias in ("ktransformers.operators.experts.KExpertsMarlin", "MLPCUDAExperts"):
        assert registry.resolve_operator(alias) is experts
    for spec, cls in ((linear, KLinearMarlin), (experts, KExpertsMarlin)):
        assert spec.distribution == "kt-ops-marlin" and set(spec.devices) == {"cuda", "cpu"}
        assert "torch's CPU int4 matmul" in spec.summary
        assert spec.load_class() is cls


def test_rule_kwargs_are_validated(rules_from):
    ok = rules_from(
        """
        - match:
            name: "^lm_head$"
          replace:
            class: KTransformersLinear
            kwargs:
              generate_op: QuantizedLinearMarlin
              prefill_op: KLinearTorch
              group_size: -1
              dtype: bfloat16
        """
    )
    assert len(ok) == 1
    with pytest.raises(RuleFileError, match="multiple of 32") as info:
        rules_from(
            """
            - match:
                name: "^lm_head$"
              replace:
                class: KTransformersLinear
                kwargs:
                  generate_op: KLinearMarlin
                  group_size: 48
            """
        )
    assert "rules.yaml:" in str(info.value)


def test_without_triton_the_kernel_module_imports_and_the_cpu_path_works(monkeypatch):
    """A private copy of `triton_kernel` imported with triton hidden: importable, clear error, CPU unaffected."""
    import importlib.util
    import sys

    import kt_ops_marlin.triton_kernel as real

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("kt_marlin_kernel_without_triton", real.__file__)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)  # dataclasses look their module up there
    spec.loader.exec_module(copy)
    assert not copy.triton_available()
    with pytest.raises(RuntimeError, match=r"needs triton, which is not installed: pip install"):
        copy.int4_matmul_triton(torch.zeros(1, 8), torch.zeros(1, 4, dtype=torch.int32), torch.ones(1, 4), 8)
    monkeypatch.setattr(device_paths, "triton_available", copy.triton_available)
    assert device_paths.path_problem("cpu") is None
    assert "needs triton" in device_paths.path_problem("cuda")
    weight = device_paths.prepare_int4(torch.randn(16, 64), 32, torch.float32, "cpu")
    assert weight(torch.randn(2, 64)).shape == (2, 16)


def test_plugin_registers_device_notes_for_explain():
    from kt_core.plugins import get_registry

    spec = get_registry().resolve_operator("KLinearMarlin")
    assert spec.note_for("cpu") == "int4, CPU path"
    assert spec.note_for("cuda:1") == "int4, Triton kernel"
