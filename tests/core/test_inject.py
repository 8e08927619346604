"""Injecting operators by rules into a real model gives the model's own outputs.

The model is built with random float32 weights; the injected copy reads its weights
from a state-dict source of the same model. Linear layers go through KLinearTorch (same
single matmul: exact) and experts through KExpertsTorch (summation order differs from
transformers': a few ulps, so atol 1e-5 on logits of magnitude ~1).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import deepseek_v2_config, qwen2_moe_config, qwen3_moe_config, random_model

from kt_core.inject import inject
from kt_core.injected import BaseInjectedModule
from kt_core.operators.experts import KTransformersExperts
from kt_core.operators.linear import KTransformersLinear
from kt_core.planner import plan
from kt_core.rules import RuleFileError, load_rules
from kt_core.rules.shipped import find_rule_file
from kt_core.weights.source import StateDictSource


def injected_copy(model, rules, registry):
    clone = copy.deepcopy(model)
    source = StateDictSource(model.state_dict())
    ops = inject(clone, plan(clone, rules), config=model.config, source=source, registry=registry)
    for op in ops:
        op.load()
    return clone, ops


@pytest.mark.parametrize(
    ("make_config", "rule_file"),
    [
        (deepseek_v2_config, "deepseek-v2-lite-cpu"),
        (lambda: deepseek_v2_config(q_lora_rank=None), "deepseek-v2-lite-cpu"),
        (qwen2_moe_config, "qwen2-moe-cpu"),
        (qwen3_moe_config, "qwen3-moe-cpu"),
    ],
)
def test_shipped_rules_reproduce_transformers_logits(make_config, rule_file, registry):
    model = random_model(make_config())
    injected, ops = injected_copy(model, load_rules(find_rule_file(rule_file), registry), registry)
    assert any(isinstance(op, KTransformersExperts) for op in ops)
    assert any(isinstance(op, KTransformersLinear) for op in ops)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        got = injected(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_injected_module_adopts_children_and_falls_through(registry, rules_from):
    model = random_model(deepseek_v2_config())
    rules = rules_from(
        r"""
        - match: {name: "\\.self_attn$"}
          replace: {class: DummyScaledModule, kwargs: {factor: 1.0}}
        - match: {class: torch.nn.Linear, name: "self_attn"}
          replace: {class: KTransformersLinear}
        """
    )
    injected, _ = injected_copy(model, rules, registry)
    attn = injected.get_submodule("model.layers.0.self_attn")
    assert isinstance(attn, BaseInjectedModule)
    assert attn.num_heads == model.config.num_attention_heads  # falls through to the original
    assert isinstance(attn.q_a_proj, KTransformersLinear)  # inner rule applied under recursive: true
    assert attn.orig_module.q_a_proj is attn.q_a_proj  # the original's forward uses the replacement
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(injected(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_third_party_plugin_operator_and_backend(registry, rules_from):
    """The dummy plugin (installed like any third-party package) is used from a rule file."""
    model = random_model(deepseek_v2_config())
    rules = rules_from(
        r"""
        - match: {name: "^lm_head$"}
          replace:
            class: KTransformersLinear
            kwargs: {generate_op: KLinearDummyOffset, offset: 0.5}
        - match: {name: "^model\\.norm$"}
          replace: {class: thirdparty.ops.Scaled, kwargs: {factor: 2.0}}
        """
    )
    injected, _ = injected_copy(model, rules, registry)
    ids = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        expected = model.lm_head(hidden * 2.0) + 0.5
        torch.testing.assert_close(injected(ids).logits, expected, rtol=1e-6, atol=1e-5)


def test_prefill_threshold_selects_the_backend(registry, rules_from):
    model = random_model(deepseek_v2_config())
    rules = rules_from(
        r"""
        - match: {name: "^lm_head$"}
          replace:
            class: KTransformersLinear
            kwargs: {generate_op: KLinearTorch, prefill_op: KLinearDummyOffset, offset: 1.0, prefill_threshold: 4}
        """
    )
    injected, _ = injected_copy(model, rules, registry)
    lm_head = injected.lm_head
    x = torch.randn(1, 3, model.config.hidden_size)
    y = torch.randn(1, 4, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(lm_head(x), model.lm_head(x))  # 3 tokens: generate backend
        torch.testing.assert_close(lm_head(y), model.lm_head(y) + 1.0)  # 4 tokens: prefill backend


@pytest.mark.parametrize(("num_tokens", "backend"), [(1, "generate"), (3, "generate"), (4, "prefill"), (9, "prefill")])
def test_prefill_threshold_selects_the_experts_backend(num_tokens, backend, registry, rules_from):
    """KTransformersExperts counts tokens ([T, H] rows) like the linear wrapper; a decode step is 1 row."""
    model = random_model(qwen3_moe_config())
    rules = rules_from(
        r"""
        - match: {name: "^model\\.layers\\.0\\.mlp\\.experts$"}
          replace:
            class: KTransformersExperts
            kwargs: {generate_op: KExpertsTorch, prefill_op: KExpertsDummyOffset, offset: 1.0, prefill_threshold: 4}
          recursive: false
        """
    )
    injected, _ = injected_copy(model, rules, registry)
    experts, original = injected.model.layers[0].mlp.experts, model.model.layers[0].mlp.experts
    assert isinstance(experts, KTransformersExperts)
    torch.manual_seed(0)
    x = torch.randn(num_tokens, model.config.hidden_size)
    ids = torch.stack([torch.randperm(model.config.num_experts)[:2] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, 2)
    with torch.no_grad():
        expected = original(x, ids, weights) + (1.0 if backend == "prefill" else 0.0)
        # Both backends compute in float32 in other summation orders than transformers: a few ulps.
        torch.testing.assert_close(experts(x, ids, weights), expected, rtol=1e-5, atol=1e-6)


def test_operator_on_wrong_module_class_is_reported(registry, rules_from):
    model = random_model(deepseek_v2_config())
    rules = rules_from(
        r"""
        - match: {name: "^model\\.norm$"}
          replace: {class: KTransformersExperts}
        """
    )
    with pytest.raises(RuleFileError, match=r"rules.yaml:2:3: error: model.norm: KTransformersExperts replaces a transformers experts module"):
        inject(model, plan(model, rules), config=model.config, source=None, registry=registry)


def test_operator_on_unsupported_device_is_reported(registry, rules_from):
    model = random_model(deepseek_v2_config())
    rules = rules_from(
        r"""
        - match: {name: "^model\\.norm$"}
          replace: {class: DummyScaledModule, kwargs: {factor: 1.0, generate_device: "cuda:0"}}
        """
    )
    with pytest.raises(RuleFileError, match=r"model.norm: DummyScaledModule cannot run on cuda:0; it runs on cpu \(use --device-map"):
        inject(model, plan(model, rules), config=model.config, source=None, registry=registry)


def test_load_unload_round_trip(registry, rules_from):
    """`unload()` frees an operator's weights (back to meta / None); `load()` reads them again, same output."""
    model = random_model(deepseek_v2_config())
    rules = rules_from(
        r"""
        - match: {name: "^model\\.norm$"}
          replace: {class: DummyScaledModule, kwargs: {factor: 1.0}}
        - match: {name: "^lm_head$"}
          replace: {class: KTransformersLinear, kwargs: {generate_op: KLinearTorch}}
        """
    )
    injected, ops = injected_copy(model, rules, registry)
    norm, head = ops
    ids = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(injected(ids).logits, expected, rtol=0, atol=1e-5)
        for op in ops:
            op.unload()
        assert norm.weight.is_meta  # falls through to the original module's (now meta) parameter
        assert head.generate_backend.weight is None
        for op in ops:
            op.load()
        assert norm.weight.device.type == "cpu"
        torch.testing.assert_close(injected(ids).logits, expected, rtol=0, atol=1e-5)



def test_the_meta_model_has_the_dtype_it_will_be_loaded_in():
    """Operators read the replaced module's dtype from the meta model (a norm's weight dtype)."""
    from tiny_models import deepseek_v2_config

    from kt_core.model_config import build_meta_model
    from kt_core.plugins import get_registry

    model = build_meta_model(deepseek_v2_config(), get_registry(), torch.bfloat16)
    assert model.model.norm.weight.is_meta and model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.kv_a_layernorm.weight.dtype == torch.bfloat16
    moe = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate"))
    assert moe.gate.weight.dtype == torch.float32  # transformers keeps its router in float32
    assert build_meta_model(deepseek_v2_config(), get_registry()).model.norm.weight.dtype == torch.float32
