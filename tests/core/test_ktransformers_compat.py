"""Rule files written for KTransformers validate, plan and build unchanged where kt has the operator.

The names and kwargs below are those KTransformers' own optimize rule files use for
DeepSeek-V2/V3 and Qwen2-MoE (including its spelling ``per_layer_prefill_intput_threshold``
and the V3 / layer-wise-prefill class paths), so a user can bring those files as they are.
"""

from __future__ import annotations

import pytest
from tiny_models import deepseek_v2_config, deepseek_v3_config, meta_model, qwen2_moe_config

from kt_core.devices import DeviceMap
from kt_core.inject import inject
from kt_core.planner import plan
from kt_core.plugins import load_plugins
from kt_core.registry import UnknownNameError
from kt_core.rules import RuleFileError

OPS = "ktransformers.operators"
MODELS = "ktransformers.models"



def model_rule(model_op: str, threshold: int = 0) -> str:
    """The model-operator rule as KTransformers writes it, layer-wise prefill switched off."""
    return f"""
- match: {{name: "^model$"}}
  replace:
    class: "{model_op}"
    kwargs:
      per_layer_prefill_intput_threshold: {threshold} # 0 is close layer wise prefill
"""


DEEPSEEK_V3_RULES = f"""
- match:
    class: {MODELS}.modeling_deepseek_v3.DeepseekV3RotaryEmbedding
  replace:
    class: {OPS}.RoPE.YarnRotaryEmbeddingV3
    kwargs: {{generate_device: "cuda", prefill_device: "cuda"}}
- match:
    name: "^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$"
  replace:
    class: {OPS}.experts.KTransformersExperts
    kwargs: {{generate_device: "cpu", generate_op: "KExpertsTorch", out_device: "cuda"}}
  recursive: False
""" + model_rule(f"{OPS}.models.KDeepseekV2Model")


@pytest.mark.parametrize(
    ("make_config", "text"),
    [
        (deepseek_v3_config, DEEPSEEK_V3_RULES),
        (deepseek_v2_config, model_rule(f"{OPS}.models.KDeepseekV2Model")),
        (qwen2_moe_config, model_rule(f"{OPS}.layer_wise_prefill.KQwen2MoeModel")),
        (qwen2_moe_config, model_rule(f"{OPS}.models.KQwen2MoeModel")),
    ],
)
def test_ktransformers_names_and_kwargs_validate_plan_and_build(make_config, text, rules_from, registry):
    model = meta_model(make_config())
    result = plan(model, rules_from(text), device_map=DeviceMap.parse(["cuda=cpu"]))
    assert result["model"].rule is not None
    assert not result.diagnostics
    ops = inject(model, result, config=model.config, source=None, registry=registry)  # constructs on meta
    assert type(ops[0]).__name__ in {"YarnRotaryEmbedding", "KDeepseekV2Model", "KQwen2MoeModel"}


def test_layer_wise_prefill_other_than_off_is_refused_with_the_reason(rules_from):
    text = model_rule(f"{OPS}.models.KDeepseekV2Model", 1024)
    with pytest.raises(RuleFileError) as info:
        rules_from(text)
    (diagnostic,) = info.value.diagnostics
    assert str(diagnostic).startswith("rules.yaml:6:43: error: replace.kwargs: per_layer_prefill_intput_threshold: ")
    assert "kt has no layer-wise prefill; only 0 (off) is accepted, got 1024" in str(diagnostic)


@pytest.mark.parametrize(
    ("name", "provider"),
    [(f"{OPS}.RoPE.YarnRotaryEmbeddingV3", "kt-models-deepseek"), (f"{OPS}.layer_wise_prefill.KQwen2MoeModel", "kt-models-qwen")],
)
def test_compat_aliases_name_their_distribution_when_it_is_absent(name, provider):
    with pytest.raises(UnknownNameError, match=f"provided by {provider}, which is not installed"):
        load_plugins([]).registry.resolve_operator(name)


# Each operator issue 4 names, with the class string KTransformers' rule files use for it
# and one kwarg its kwargs model must declare beyond the devices (None: devices only).
KT_NAMED_OPERATORS = [
    ("KDeepseekV2Attention", f"{OPS}.attention.KDeepseekV2Attention", "prefill_threshold"),
    ("KDeepseekV2MoE", f"{OPS}.experts.KDeepseekV2MoE", None),
    ("KDeepseekV3MoE", f"{OPS}.experts.KDeepseekV3MoE", None),
    ("KDeepseekV2Model", f"{OPS}.models.KDeepseekV2Model", "transfer_map"),
    ("YarnRotaryEmbedding", f"{OPS}.RoPE.YarnRotaryEmbedding", None),
    ("KQwen2MoeSparseMoeBlock", f"{OPS}.experts.KQwen2MoeSparseMoeBlock", None),
    ("KQwen3MoeSparseMoeBlock", f"{OPS}.experts.KQwen3MoeSparseMoeBlock", None),
    ("KQwen2MoeModel", f"{OPS}.models.KQwen2MoeModel", "transfer_map"),
    ("RotaryEmbedding", f"{OPS}.RoPE.RotaryEmbedding", None),
    ("KTransformersLinear", f"{OPS}.linear.KTransformersLinear", "prefill_threshold"),
    ("KTransformersExperts", f"{OPS}.experts.KTransformersExperts", "prefill_threshold"),
]


@pytest.mark.parametrize(("name", "alias", "kwarg"), KT_NAMED_OPERATORS, ids=[n for n, _, _ in KT_NAMED_OPERATORS])
def test_operators_have_their_ktransformers_alias_and_a_kwargs_model(name, alias, kwarg, registry):
    spec = registry.resolve_operator(alias)
    assert spec.name == name
    fields = spec.kwargs_model.model_fields
    assert {"generate_device", "prefill_device"} <= set(fields)
    if kwarg is not None:
        assert kwarg in fields
    if spec.kwargs_model.model_config.get("extra") == "forbid":
        # A typo is rejected, not passed to the constructor. (The wrappers allow extra keys,
        # which the rule loader checks against their backends' kwargs: test_rules_loader.py.)
        with pytest.raises(ValueError, match="generate_devce"):
            spec.kwargs_model(generate_devce="cpu")
    assert spec.load_class().__name__ == name
