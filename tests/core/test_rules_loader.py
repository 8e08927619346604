"""Rule files: every kind of mistake is reported at FILE:LINE:COL, before anything is built."""

from __future__ import annotations

import textwrap

import pytest

from kt_core.rules import RuleFileError, load_rules


def errors_of(rules_from, text: str) -> list[str]:
    with pytest.raises(RuleFileError) as info:
        rules_from(text)
    return [str(d) for d in info.value.diagnostics]


def test_valid_ktransformers_style_rules_resolve_aliases(rules_from):
    rules = rules_from(
        r"""
        - match:
            name: "^model\\.layers\\..*\\.mlp\\.experts$"
          replace:
            class: ktransformers.operators.experts.KTransformersExperts
            kwargs:
              generate_device: "cpu"
              generate_op: "KExpertsTorch"
              out_device: "cpu"
          recursive: False
        - match:
            name: "^model\\.layers\\.(?!.*self_attn).*$"
            class: torch.nn.Linear
          replace:
            class: ktransformers.operators.linear.KTransformersLinear
            kwargs:
              generate_device: "cpu"
              generate_op: "KLinearTorch"
              prefill_op: "KLinearTorch"
              dtype: bfloat16
        - match:
            class: ktransformers.models.modeling_deepseek.DeepseekV2MoE
          replace:
            class: "default"
        """
    )
    assert [r.operator_name for r in rules] == ["KTransformersExperts", "KTransformersLinear", "default"]
    assert rules.rules[0].recursive is False
    assert rules.rules[1].match_class.name == "torch.nn.Linear"
    assert rules.rules[2].match_class.name == "DeepseekV2Moe"
    assert rules.rules[1].backend_kwargs == {"KLinearTorch": {"dtype": "bfloat16"}}
    assert rules.rules[0].location.line == 2


def test_unknown_key_points_at_the_key_and_suggests(rules_from):
    errors = errors_of(
        rules_from,
        """
        - match:
            name: "^lm_head$"
          replace:
            class: default
            kwargs:
              generate_devce: cpu
        """,
    )
    assert errors == [
        "rules.yaml:7:7: error: replace.kwargs: unknown key 'generate_devce'; did you mean 'generate_device'? "
        "(expected one of: generate_device, prefill_device)"
    ]


def test_typo_of_a_wrapper_key_is_suggested(rules_from):
    """Wrappers pass unknown keys on to backends, so a typo of their own keys must still be caught and named."""
    (error,) = errors_of(
        rules_from,
        """
        - match: {name: "experts$"}
          replace:
            class: ktransformers.operators.experts.KTransformersExperts
            kwargs:
              generate_op: KExpertsTorch
              generate_devce: cpu
          recursive: false
        """,
    )
    assert error.startswith(
        "rules.yaml:7:7: error: replace.kwargs: unknown key 'generate_devce' for KTransformersExperts with "
        "KExpertsTorch; did you mean 'generate_device'? (expected one of: "
    )


def test_unknown_top_level_key(rules_from):
    (error,) = errors_of(rules_from, "- match: {name: x}\n  replace: {class: default}\n  recursve: false\n")
    assert error.startswith("rules.yaml:3:3: error: unknown key 'recursve'; did you mean 'recursive'?")


def test_invalid_regex_points_at_the_value(rules_from):
    (error,) = errors_of(rules_from, '- match:\n    name: "model.(layers"\n  replace:\n    class: default\n')
    assert error.startswith("rules.yaml:2:11: error: match.name: invalid regular expression 'model.(layers'")


def test_match_needs_name_or_class(rules_from):
    (error,) = errors_of(rules_from, "- match: {}\n  replace: {class: default}\n")
    assert "rules.yaml:1:10: error: match: a match needs 'name', 'class' or both" in error


def test_yaml_syntax_error_has_position(rules_from):
    (error,) = errors_of(rules_from, "- match:\n    name: [unclosed\n  replace: {class: default}\n")
    assert error.startswith("rules.yaml:3:")
    assert "YAML syntax error" in error


def test_top_level_must_be_a_list(rules_from):
    (error,) = errors_of(rules_from, "match: {name: x}\n")
    assert error == "rules.yaml:1:1: error: expected a list of rules (- match: … replace: …), got a CommentedMap"


def test_wrong_kwarg_type_and_bad_device(rules_from):
    errors = errors_of(
        rules_from,
        """
        - match: {name: "^lm_head$"}
          replace:
            class: KTransformersLinear
            kwargs:
              generate_device: gpu0
              prefill_threshold: many
        """,
    )
    assert errors[0].startswith(
        "rules.yaml:6:24: error: replace.kwargs: generate_device: 'gpu0' is not a device; expected 'cpu', 'cuda' or 'cuda:N'"
    )
    assert errors[1].startswith("rules.yaml:7:26: error: replace.kwargs: prefill_threshold: Input should be a valid integer")


def test_devices_are_checked_for_form_not_availability(rules_from):
    rules = rules_from('- match: {name: "^lm_head$"}\n  replace: {class: default, kwargs: {generate_device: "cuda:7"}}\n')
    assert rules.rules[0].kwargs == {"generate_device": "cuda:7"}


def test_unknown_operator_did_you_mean(rules_from):
    (error,) = errors_of(rules_from, "- match: {name: x}\n  replace: {class: KTransformersLiner}\n")
    assert error.startswith("rules.yaml:2:20: error: replace.class: unknown operator 'KTransformersLiner'; did you mean 'KTransformersLinear'")


def test_unknown_match_class_did_you_mean(rules_from):
    (error,) = errors_of(rules_from, "- match: {class: torch.nn.Linaer}\n  replace: {class: default}\n")
    assert "match.class: unknown class 'torch.nn.Linaer'; did you mean 'torch.nn.Linear'" in error


def test_known_operator_of_missing_plugin_names_the_distribution():
    from kt_core.plugins import load_plugins
    from kt_core.rules import parse_rules

    without_marlin = load_plugins(allow=frozenset({"kt-ops-torch"})).registry
    with pytest.raises(RuleFileError) as info:
        parse_rules("- match: {name: experts$}\n  replace: {class: KTransformersExperts, kwargs: {generate_op: KExpertsMarlin}}\n",
                    without_marlin, "rules.yaml")
    assert "'KExpertsMarlin' is provided by kt-ops-marlin, which is not installed" in str(info.value)
    assert "pip install kt-ops-marlin" in str(info.value)


def test_retired_ktransformers_name_is_explained(rules_from):
    (error,) = errors_of(rules_from, "- match: {name: gate}\n  replace: {class: ktransformers.operators.gate.KMoEGate}\n")
    assert "has no counterpart in kt" in error and "replace the MoE block" in error


def test_backend_used_as_replacement_is_explained(rules_from):
    (error,) = errors_of(rules_from, "- match: {name: x}\n  replace: {class: KLinearTorch}\n")
    assert "KLinearTorch is a linear-backend; use it as generate_op or prefill_op of a wrapper (KTransformersLinear)" in error


def test_backend_of_the_wrong_kind(rules_from):
    (error,) = errors_of(rules_from, "- match: {name: x}\n  replace: {class: KTransformersLinear, kwargs: {generate_op: KExpertsTorch}}\n")
    assert "replace.kwargs.generate_op: 'KExpertsTorch' is an experts-backend operator, but a linear-backend operator is expected" in error


def test_backend_kwargs_are_validated_against_chosen_backends(rules_from):
    errors = errors_of(
        rules_from,
        """
        - match: {name: x}
          replace:
            class: KTransformersLinear
            kwargs:
              generate_op: KLinearTorch
              dtype: float8
              flavour: vanilla
        """,
    )
    assert any("(KLinearTorch): dtype: Input should be 'float32', 'float16' or 'bfloat16'" in e for e in errors)
    assert any(e.startswith("rules.yaml:8:7: error: replace.kwargs: unknown key 'flavour' for KTransformersLinear") for e in errors)


def test_all_problems_reported_together(rules_from):
    errors = errors_of(
        rules_from,
        """
        - match: {name: "("}
          replace: {class: default}
        - match: {name: x}
          replace: {class: Nope}
        """,
    )
    assert len(errors) == 2


def test_unregistered_dotted_path_is_rejected_without_import(tmp_path, monkeypatch, registry):
    marker = tmp_path / "imported.txt"
    (tmp_path / "evil_rule_module.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text("- match: {class: evil_rule_module.Evil}\n  replace: {class: evil_rule_module.Evil}\n")
    with pytest.raises(RuleFileError) as info:
        load_rules(rule_file, registry)
    text = str(info.value)
    assert "unknown operator 'evil_rule_module.Evil'" in text
    assert "never by importing a dotted path" in text
    assert not marker.exists()
    import sys

    assert "evil_rule_module" not in sys.modules


def test_missing_file_is_a_user_error(tmp_path, registry):
    with pytest.raises(RuleFileError, match="rule file not found"):
        load_rules(tmp_path / "absent.yaml", registry)


def test_shipped_rule_files_validate(registry):
    from kt_core.rules.shipped import shipped_rule_files

    shipped = shipped_rule_files()
    assert {"deepseek-v2-lite-cpu", "qwen2-moe-cpu"} <= set(shipped)
    for path in shipped.values():
        assert len(load_rules(path, registry)) > 0


def test_tutorial_rules_snippet_validates_unchanged(rules_from):
    """The tutorial's rules for operators kt already has, pasted as written (recursive: False, quotes)."""
    text = textwrap.dedent(
        r'''
        - match:
            name: "^model\\.layers\\..*\\.mlp\\.experts$"
          replace:
            class: ktransformers.operators.experts.KTransformersExperts     # custom MoE Kernel with expert paralleism
            kwargs:
              generate_device: "cpu"
              generate_op: "KExpertsTorch"
              out_device: "cuda"
          recursive: False # don't recursively inject submodules of this module
        - match:
            name: "^model\\.layers\\..*\\.|^lm_head"
          replace:
            class: "default"
            kwargs:
              generate_device: "cuda"
        - match:
            name: "^model.embed_tokens"
          replace:
            class: "default"
            kwargs:
              generate_device: "cpu"
        '''
    )
    assert len(rules_from(text)) == 3
