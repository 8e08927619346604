"""The planner honours the tutorial's rule semantics, on a model built on meta."""

from __future__ import annotations

import pytest
from tiny_models import deepseek_v2_config, meta_model, qwen2_moe_config

from kt_core.devices import DeviceMap
from kt_core.planner import plan
from kt_core.rules import RuleFileError


@pytest.fixture(scope="module")
def deepseek():
    return meta_model(deepseek_v2_config())


def test_first_matching_rule_decides(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {name: "^lm_head$"}
          replace: {class: default, kwargs: {generate_device: "cuda:1"}}
        - match: {name: "^lm_head$"}
          replace: {class: default, kwargs: {generate_device: cpu}}
        """
    )
    result = plan(deepseek, rules)
    assert result["lm_head"].rule == 0
    assert result["lm_head"].device == "cuda:1"
    assert [d.rule for d in result.diagnostics] == [1]
    assert "already decided by earlier rule(s) 0" in result.diagnostics[0].message


def test_name_and_class_must_both_hold(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {name: "^model\\.layers\\.0\\.", class: torch.nn.Linear}
          replace: {class: KTransformersLinear}
        """
    )
    result = plan(deepseek, rules)
    replaced = {d.module for d in result.replacements()}
    assert "model.layers.0.self_attn.q_a_proj" in replaced
    assert "model.layers.0.self_attn.q_a_layernorm" not in replaced  # name matches, class does not
    assert "model.layers.1.mlp.shared_experts.gate_proj" not in replaced  # class matches, name does not
    assert all(d.module.startswith("model.layers.0.") for d in result.replacements())


def test_recursive_false_covers_submodules(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {name: "\\.self_attn$"}
          replace: {class: DummyScaledModule, kwargs: {factor: 2.0, generate_device: cpu}}
          recursive: false
        - match: {class: torch.nn.Linear}
          replace: {class: KTransformersLinear}
        """
    )
    result = plan(deepseek, rules)
    q = result["model.layers.1.self_attn.q_a_proj"]
    assert q.origin == "covered" and q.covered_by == "model.layers.1.self_attn" and q.rule is None
    assert result["model.layers.1.mlp.shared_experts.up_proj"].operator == "KTransformersLinear"


def test_recursive_false_on_default_keeps_the_subtree_whole(deepseek, rules_from):
    """``default`` + ``recursive: false`` stops the walk too: later rules never see the submodules."""
    rules = rules_from(
        r"""
        - match: {name: "\\.self_attn$"}
          replace: {class: default, kwargs: {generate_device: "cuda:0"}}
          recursive: false
        - match: {class: torch.nn.Linear, name: "self_attn"}
          replace: {class: KTransformersLinear}
        """
    )
    result = plan(deepseek, rules)
    q = result["model.layers.1.self_attn.q_a_proj"]
    assert (q.origin, q.operator, q.device, q.rule) == ("covered", "default", "cuda:0", None)
    assert q.covered_by == "model.layers.1.self_attn"
    assert not any("self_attn" in d.module for d in result.replacements())
    (warning,) = result.diagnostics
    assert "inside modules kept (default) with recursive: false" in warning.message


def test_recursive_true_lets_inner_rules_apply(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {name: "\\.self_attn$"}
          replace: {class: DummyScaledModule, kwargs: {factor: 2.0}}
        - match: {class: torch.nn.Linear}
          replace: {class: KTransformersLinear}
        """
    )
    result = plan(deepseek, rules)
    assert result["model.layers.1.self_attn.q_a_proj"].operator == "KTransformersLinear"


def test_default_keeps_and_places_with_inheritance(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {name: "^model\\.layers\\.1$"}
          replace: {class: default, kwargs: {generate_device: "cuda:0"}}
        """
    )
    result = plan(deepseek, rules)
    assert result["model.layers.1"].operator == "default"
    sub = result["model.layers.1.mlp.experts"]
    assert (sub.origin, sub.device, sub.rule) == ("inherited", "cuda:0", None)
    assert result["model.layers.2"].device == "cpu"  # no decided ancestor: the fallback
    assert result[""].origin == "root"


def test_operator_without_device_inherits(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {name: "^model\\.layers\\.2$"}
          replace: {class: default, kwargs: {generate_device: "cuda:1"}}
        - match: {name: "experts$"}
          replace: {class: KTransformersExperts}
          recursive: false
        """
    )
    result = plan(deepseek, rules)
    assert result["model.layers.2.mlp.experts"].device == "cuda:1"
    assert result["model.layers.1.mlp.experts"].device == "cpu"


def test_device_map_remaps_every_device_kwarg(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {name: "experts$"}
          replace:
            class: KTransformersExperts
            kwargs: {generate_device: cpu, out_device: "cuda:1", prefill_device: "cuda"}
          recursive: false
        - match: {name: "^model"}
          replace: {class: default, kwargs: {generate_device: "cuda:0"}}
        """
    )
    result = plan(deepseek, rules, device_map=DeviceMap.parse(["cuda:0=cpu", "cuda:1=cpu"]))
    experts = result["model.layers.1.mlp.experts"]
    assert experts.kwargs == {"generate_device": "cpu", "out_device": "cpu", "prefill_device": "cpu", "generate_op": "KExpertsTorch"}
    assert {d.device for d in result.decisions} == {"cpu"}


def test_unmatched_and_covered_rules_are_reported(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {name: "\\.mlp\\.experts$"}
          replace: {class: KTransformersExperts}
          recursive: false
        - match: {name: "\\.mlp\\.experts\\.act_fn$"}
          replace: {class: default}
        - match: {name: "^does\\.not\\.exist$"}
          replace: {class: default}
        """
    )
    result = plan(deepseek, rules)
    messages = {d.rule: d.message for d in result.diagnostics}
    assert "inside operators replaced with recursive: false" in messages[1]
    assert messages[2] == "rule 2 matches no module of this model"
    assert str(result.diagnostics[1].location) == "rules.yaml:7:3"
    with pytest.raises(RuleFileError):
        result.raise_if_strict()


def test_plan_is_pure(deepseek, rules_from):
    rules = rules_from(
        r"""
        - match: {class: torch.nn.Linear}
          replace: {class: KTransformersLinear}
        """
    )
    before = [(n, type(m)) for n, m in deepseek.named_modules()]
    assert plan(deepseek, rules).decisions == plan(deepseek, rules).decisions
    assert [(n, type(m)) for n, m in deepseek.named_modules()] == before


def test_ktransformers_class_alias_matches_transformers_class(rules_from):
    model = meta_model(deepseek_v2_config())
    rules = rules_from(
        r"""
        - match: {class: ktransformers.models.modeling_deepseek.DeepseekV2YarnRotaryEmbedding}
          replace: {class: default, kwargs: {generate_device: "cuda:0"}}
        """
    )
    assert plan(model, rules)["model.rotary_emb"].rule == 0


def test_qwen_plan(rules_from):
    model = meta_model(qwen2_moe_config())
    from kt_core.plugins import get_registry
    from kt_core.rules import load_rules
    from kt_core.rules.shipped import find_rule_file

    result = plan(model, load_rules(find_rule_file("qwen2-moe-cpu"), get_registry()))
    assert result["model.layers.0.mlp.experts"].operator == "KTransformersExperts"
    assert result["model.layers.0.mlp.shared_expert_gate"].operator == "KTransformersLinear"
    assert result["model.layers.0.self_attn.q_proj"].operator == "KTransformersLinear"
    assert result["model.layers.0.self_attn"].operator == "default"  # transformers' attention, kept
    assert not result.diagnostics
