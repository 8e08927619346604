"""The two Marlin rule files end to end on tiny models, remapped to the CPU.

``kt generate --device-map cuda=cpu`` with the shipped ``*-gpu-marlin`` rule files (group
size made to fit the tiny models: 32 for DeepSeek, per-channel for Qwen2-MoE, whose
shared expert has K = 48) must give the greedy tokens of the same rules with the int4
backends replaced by `KLinearTorch` / `KExpertsTorch`, run on a copy of the model whose
tensors those backends read hold the int4 values dequantized to float32 (the reference:
no int4 code on that side beyond the quantizer, which `test_int4_format` checks).

Why tokens must be equal: both sides compute in float32 on identical weight values;
they differ only in summation order inside the matmuls (torch's CPU int4 kernel vs
float matmuls), ~1e-6 relative. The prompt logits are compared with atol 1e-4 (logits
are ~1; 100× the observed difference), and the top-2 logit gaps of these random models
are far larger, so a token mismatch would be a real bug — and deterministic, not a
flake, since both sides are deterministic. The prompt is shorter than the rules'
``prefill_threshold`` (32), so every call runs the int4 ``generate_op``; at or above it
the tutorial's rules prefill with `KLinearTorch` on the float weights, by design.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from marlin_e2e import CASES, PROMPT, int4_tensors, reference_dir, save_model_dir, tiny_rules, torch_rules
from tiny_models import deepseek_v2_config, random_model

from kt_core.cli.main import main
from kt_core.demo.tokenizer import build_demo_tokenizer
from kt_core.devices import DeviceMap
from kt_core.plugins import get_registry
from kt_core.rules import load_rules
from kt_core.runtime.generate import Session
from kt_core.runtime.load import load_model
from kt_core.runtime.model_source import open_model

STEPS = 16
CPU = ["--device-map", "cuda=cpu"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def _generate(capsys, *args: str) -> list[int]:
    assert main(["generate", *args, "--prompt", PROMPT, "--max-new-tokens", str(STEPS), "--dtype", "float32",
                 "--json", *CPU]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def _prompt_logits(model_args: dict, rules_path: Path, ids: list[int]) -> torch.Tensor:
    registry = get_registry()
    inputs = open_model(model_args.get("model"), model_args.get("gguf"), registry)
    loaded = load_model(inputs.config, load_rules(rules_path, registry), inputs.source, registry,
                        device_map=DeviceMap.parse(["cuda=cpu"]), dtype=torch.float32, show_progress=False)
    logits, _ = Session(loaded.model, loaded.config, 64).prefill(ids)
    return logits


@pytest.mark.parametrize("kind", list(CASES))
def test_marlin_rules_on_cpu_match_torch_on_int4_weights(kind, tmp_path, tokenizer, capsys):
    make_config, rules_name, substitutions = CASES[kind]
    config = make_config(vocab_size=len(tokenizer))
    model = random_model(config, seed=1)
    model_dir = save_model_dir(model, tokenizer, tmp_path / "model")
    ids = tokenizer.encode(PROMPT)
    assert len(ids) < 32  # below prefill_threshold: the int4 generate_op runs every call

    marlin_rules = tiny_rules(rules_name, substitutions, tmp_path / "marlin.yaml")
    reference_rules = torch_rules(marlin_rules, tmp_path / "torch.yaml")
    tensors = int4_tensors(config, marlin_rules)
    assert any(t.endswith("experts.down_proj") for t in tensors) and "lm_head.weight" in tensors
    reference = reference_dir(model, tensors, tokenizer, tmp_path / "reference")

    got = _generate(capsys, "--model", str(model_dir), "--rules", str(marlin_rules))
    expected = _generate(capsys, "--model", str(reference), "--rules", str(reference_rules))
    assert got == expected

    marlin_logits = _prompt_logits({"model": str(model_dir)}, marlin_rules, ids)
    torch_logits = _prompt_logits({"model": str(reference)}, reference_rules, ids)
    torch.testing.assert_close(marlin_logits, torch_logits, rtol=0, atol=1e-4)
    # …and int4 is not a no-op: the float model's logits differ by far more.
    float_logits = _prompt_logits({"model": str(model_dir)}, reference_rules, ids)
    assert float((float_logits - marlin_logits).abs().max()) > 1e-2


def test_marlin_rules_from_a_q8_0_gguf(tmp_path, tokenizer, capsys):
    """Any GGUF type in: the int4 backends re-quantize the Q8_0-dequantized weights at load."""
    make_config, rules_name, substitutions = CASES["deepseek-v2-lite"]
    config = make_config(vocab_size=len(tokenizer))
    model = random_model(config, seed=3)
    model_dir = save_model_dir(model, tokenizer, tmp_path / "model")
    q8 = tmp_path / "model-Q8_0.gguf"
    assert main(["convert", str(model_dir), str(q8), "--type", "Q8_0"]) == 0
    capsys.readouterr()

    marlin_rules = tiny_rules(rules_name, substitutions, tmp_path / "marlin.yaml")
    reference_rules = torch_rules(marlin_rules, tmp_path / "torch.yaml")
    source = open_model(None, str(q8), get_registry()).source
    with torch.no_grad():  # the reference starts from exactly what the GGUF holds
        for name, tensor in model.state_dict().items():
            tensor.copy_(source.load(name, dtype=torch.float32))
    reference = reference_dir(model, int4_tensors(config, marlin_rules), tokenizer, tmp_path / "reference")

    got = _generate(capsys, "--gguf", str(q8), "--rules", str(marlin_rules))
    assert got == _generate(capsys, "--model", str(reference), "--rules", str(reference_rules))


def test_explain_shows_the_marlin_backends_on_the_cpu(capsys):
    assert main(["rules", "explain", "qwen2-moe-gpu-marlin", "--model", "Qwen/Qwen2-57B-A14B-Instruct", *CPU]) == 0
    out = capsys.readouterr().out
    assert "generate_op=KLinearMarlin" in out and "generate_op=KExpertsMarlin" in out
    assert "cuda" not in out.split("\n\n")[0].replace("cuda=", "")  # every device remapped


def test_wrong_group_size_for_the_model_is_one_clear_error(tmp_path, tokenizer, capsys):
    """The shipped group size 128 does not divide the tiny models' K = 64: named per tensor, before loading."""
    config = deepseek_v2_config(q_lora_rank=None, vocab_size=len(tokenizer))
    model_dir = save_model_dir(random_model(config), tokenizer, tmp_path / "model")
    assert main(["generate", "--model", str(model_dir), "--rules", "deepseek-v2-lite-gpu-marlin", "--prompt", "x",
                 "--json", *CPU]) == 2
    err = capsys.readouterr().err
    assert "the planned operators cannot use these weights" in err
    assert "model.layers.0.mlp.gate_proj.weight: in_features K=64 is not divisible by group_size=128" in err
