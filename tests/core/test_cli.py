"""The `kt` command line: outputs, JSON shapes, and exit code 2 without traceback on user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from ruamel.yaml import YAML

from kt_core.cli.main import main
from kt_core.rules.shipped import shipped_rule_files

BUILTIN_MODELS = [
    "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "deepseek-ai/DeepSeek-V2-Chat",
    "deepseek-ai/DeepSeek-V3",
    "Qwen/Qwen2-57B-A14B-Instruct",
    "Qwen/Qwen3-30B-A3B",
]


def run_kt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kt_core.cli.main", *args], capture_output=True, text=True)


def test_explain_json_shape(capsys):
    assert main(["rules", "explain", "deepseek-v2-lite-cpu", "--model", BUILTIN_MODELS[0], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_module = {r["module"]: r for r in rows}
    assert {"module", "rule", "operator", "device"} <= set(rows[0])
    experts = by_module["model.layers.5.mlp.experts"]
    assert (experts["rule"], experts["operator"], experts["device"]) == (2, "KTransformersExperts", "cpu")
    assert by_module["model.layers.5.self_attn"]["operator"] == "KDeepseekV2Attention"
    assert by_module["model.layers.5.self_attn.kv_b_proj"]["operator"] == "default"
    assert by_module["model.layers"]["rule"] is None  # no rule: inherited
    assert len([r for r in rows if r["module"].endswith("mlp.experts")]) == 26  # layer 0 is dense


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_explain_every_builtin_config(model, capsys):
    rules = {"Qwen/Qwen3-30B-A3B": "qwen3-moe-cpu", "Qwen/Qwen2-57B-A14B-Instruct": "qwen2-moe-cpu"}.get(model, "deepseek-v2-lite-cpu")
    assert main(["rules", "explain", rules, "--model", model]) == 0
    out = capsys.readouterr().out
    assert "KTransformersExperts [generate_op=KExpertsCPU, prefill_op=KExpertsCPU]" in out
    assert "modules," in out


TORCH_RULES = {
    "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-v2-lite-cpu-torch",
    "deepseek-ai/DeepSeek-V2-Chat": "deepseek-v2-lite-cpu-torch",
    "deepseek-ai/DeepSeek-V3": "deepseek-v3-cpu-torch",
    "Qwen/Qwen2-57B-A14B-Instruct": "qwen2-moe-cpu-torch",
    "Qwen/Qwen3-30B-A3B": "qwen3-moe-cpu-torch",
}


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_pytorch_rule_files_place_every_builtin_model_on_the_cpu(model, capsys):
    """The all-PyTorch shipped rules: every MoE block's experts on KExpertsTorch, lm_head on KLinearTorch, all on cpu."""
    assert main(["rules", "explain", TORCH_RULES[model], "--model", model, "--json", "--strict"]) == 0
    rows = {r["module"]: r for r in json.loads(capsys.readouterr().out)}
    assert {r["device"] for r in rows.values()} == {"cpu"}
    moe_blocks = [m for m, r in rows.items() if m.endswith(".mlp") and r["operator"].endswith(("MoE", "SparseMoeBlock"))]
    experts = [r for m, r in rows.items() if m.endswith(".mlp.experts")]
    assert moe_blocks and len(experts) == len(moe_blocks)
    assert all((r["operator"], r["kwargs"]["generate_op"]) == ("KTransformersExperts", "KExpertsTorch") for r in experts)
    assert (rows["lm_head"]["operator"], rows["lm_head"]["kwargs"]["generate_op"]) == ("KTransformersLinear", "KLinearTorch")
    assert rows["model.embed_tokens"]["operator"] == "default" and rows["model.embed_tokens"]["rule"] is not None


def test_explain_text_groups_layers(capsys):
    main(["rules", "explain", "deepseek-v2-lite-cpu", "--model", BUILTIN_MODELS[0]])
    out = capsys.readouterr().out
    assert "model.layers.{1-26}.mlp.experts" in out


def test_explain_with_device_map_on_gpu_rules(tmp_path, capsys):
    rules = tmp_path / "gpu.yaml"
    rules.write_text(
        '- match: {name: "mlp\\\\.experts$"}\n'
        "  replace: {class: KTransformersExperts, kwargs: {generate_device: cpu, out_device: 'cuda:0'}}\n"
        "  recursive: false\n"
        '- match: {name: "^model"}\n'
        "  replace: {class: default, kwargs: {generate_device: 'cuda:0'}}\n"
    )
    assert main(["rules", "explain", str(rules), "--model", BUILTIN_MODELS[0], "--json", "--device-map", "cuda:0=cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["device"] for r in rows} == {"cpu"}
    assert next(r for r in rows if r["module"] == "model.layers.3.mlp.experts")["kwargs"]["out_device"] == "cpu"


def test_repeated_problems_are_reported_once(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text('- match: {name: "shared_experts$"}\n  replace: {class: KTransformersExperts}\n')
    result = run_kt("rules", "explain", str(rules), "--model", BUILTIN_MODELS[0])
    assert result.returncode == 2
    assert result.stderr.count("error:") == 2  # "kt: error:" plus one diagnostic for 26 modules
    assert "model.layers.1.mlp.shared_experts (and 25 more modules): KTransformersExperts replaces" in result.stderr


def test_user_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- match: {name: x}\n  replace: {class: KExpertsCPUU}\n")
    cases = [
        ("rules", "validate", str(bad)),
        ("rules", "explain", "nope-rules", "--model", BUILTIN_MODELS[0]),
        ("rules", "explain", "deepseek-v2-lite-cpu", "--model", "deepseek-ai/DeepSeek-V2-Lyte"),
        ("rules", "explain", "deepseek-v2-lite-cpu", "--model", BUILTIN_MODELS[0], "--device-map", "gpu=cpu"),
    ]
    messages = []
    for args in cases:
        result = run_kt(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        messages.append(result.stderr)
    assert f"{bad}:2:20: error: replace.class: unknown operator 'KExpertsCPUU'" in messages[0]
    assert "rule file 'nope-rules' not found" in messages[1] and "deepseek-v2-lite-cpu" in messages[1]
    assert "did you mean 'deepseek-ai/DeepSeek-V2-Lite'" in messages[2]
    assert "'gpu' is not a device" in messages[3]


def test_validate_reports_every_file_even_when_one_is_missing(tmp_path, capsys):
    assert main(["rules", "validate", str(tmp_path / "absent.yaml"), "qwen2-moe-cpu-torch"]) == 2
    captured = capsys.readouterr()
    assert "qwen2-moe-cpu-torch: ok" in captured.out
    assert f"rule file '{tmp_path / 'absent.yaml'}' not found" in captured.err


def test_model_directory_with_config(tmp_path, capsys):
    from tiny_models import qwen3_moe_config

    qwen3_moe_config().save_pretrained(tmp_path)
    assert main(["rules", "explain", "qwen3-moe-cpu", "--model", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["module"] == "model.layers.2.mlp.experts" and r["operator"] == "KTransformersExperts" for r in rows)


def test_validate_strict_turns_warnings_into_errors(tmp_path, capsys):
    rules = tmp_path / "r.yaml"
    rules.write_text('- match: {name: "^nothing$"}\n  replace: {class: default}\n')
    assert main(["rules", "validate", str(rules)]) == 0
    assert main(["rules", "validate", str(rules), "--model", BUILTIN_MODELS[0]]) == 0
    assert "warning: rule 0 matches no module of this model" in capsys.readouterr().err
    assert main(["rules", "validate", str(rules), "--model", BUILTIN_MODELS[0], "--strict"]) == 2
    assert "error: rule 0 matches no module" in capsys.readouterr().err


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    report = {r["distribution"]: r for r in json.loads(capsys.readouterr().out)}
    assert report["kt-ops-torch"]["version"] == "0.1.0"
    assert {"KLinearTorch", "KExpertsTorch"} <= {o["name"] for o in report["kt-ops-torch"]["operators"]}
    assert "deepseek-ai/DeepSeek-V3" in report["kt-models-deepseek"]["model_families"][0]["builtin_configs"]
    assert any(c["name"] == "DeepseekV2Moe" for c in report["kt-models-deepseek"]["model_classes"])


def test_plugins_table(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "kt-dummy-plugin" in out and "KExpertsTorch" in out
    moe_row = next(line for line in out.splitlines() if line.startswith("DeepseekV2Moe "))
    assert "kt-models-deepseek" in moe_row and "ktransformers.models.modeling_deepseek.DeepseekV2MoE" in moe_row


def test_schema_validates_shipped_rules_and_rejects_typos(tmp_path, capsys):
    out = tmp_path / "schema.json"
    assert main(["rules", "schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    yaml = YAML(typ="safe")
    for path in shipped_rule_files().values():
        validator.validate(yaml.load(path.read_text()))
    bad_kwarg = [{"match": {"name": "x"}, "replace": {"class": "KTransformersLinear", "kwargs": {"generate_devce": "cpu"}}}]
    bad_backend = [{"match": {"name": "x"}, "replace": {"class": "KTransformersLinear", "kwargs": {"generate_op": "KExpertsTorch"}}}]
    bad_device = [{"match": {"name": "x"}, "replace": {"class": "default", "kwargs": {"generate_device": "gpu"}}}]
    for doc in (bad_kwarg, bad_backend, bad_device):
        assert not validator.is_valid(doc)
    dummy_ok = [{"match": {"name": "x"}, "replace": {"class": "DummyScaledModule", "kwargs": {"factor": 2}}}]
    assert validator.is_valid(dummy_ok)
    assert "KLinearDummyOffset" in json.dumps(schema)  # third-party backends are in the schema


def test_explain_shows_device_notes_of_backends(capsys):
    """Marlin on the CPU runs the same int4 weights through a CPU path, and explain says so."""
    args = ["rules", "explain", "deepseek-v2-lite-gpu-marlin", "--model", BUILTIN_MODELS[0]]
    assert main([*args, "--device-map", "cuda=cpu"]) == 0
    assert "generate_op=KLinearMarlin (int4, CPU path)" in capsys.readouterr().out
    assert main(args) == 0
    assert "generate_op=KLinearMarlin (int4, Triton kernel)" in capsys.readouterr().out


def test_explain_shows_the_attention_per_head_backend(capsys):
    assert main(["rules", "explain", "deepseek-v2-lite-cpu", "--model", "deepseek-ai/DeepSeek-V2-Lite-Chat"]) == 0
    assert "KDeepseekV2Attention [absorb_op=KHeadwiseLinearCPUInfer]" in capsys.readouterr().out
