"""End to end: `kt generate` with the routed experts on the CPU engine vs on KExpertsTorch.

A tiny DeepSeek-V2-Lite and a tiny Qwen2-MoE are saved, converted with ``kt convert
--type Q8_0`` (hidden 64, expert rows of 64 and 32 values: whole Q8_0 blocks) and generated
greedily twice from the same GGUF: with the shipped CPU rules (KExpertsCPU: the engine on
the Q8_0 blocks, with Q8_0-quantized activations) and with their ``-torch`` variants
(KExpertsTorch on the dequantized experts).

The shipped CPU rules run every linear layer on the engine too (attention's projections,
shared experts, lm_head), so a token's path from the embedding to the logits passes about
a dozen products with quantized activations. Each value is off by at most 1/254 of its
block's largest (see cpuinfer_refs), which is ~0.2% RMS relative error per product; a
dozen of them, compounding through the residual stream, give ~0.7% RMS, and the largest
of 512 logits' errors lands near three times that: 2-2.5% of the logit scale measured
on these models. The error is not uniform over steps: single steps reach 5% here (and
6.5% with only the dense linears on the engine), against 0.4% with only the experts on
it, so the tiny models' dense path amplifies some steps' errors. The bound on every step
is therefore STEP_TOL, and LOGIT_TOL holds for the median step. So:
* along the reference's greedy path (teacher-forced), the median step's logits must agree
  within LOGIT_TOL of the logit scale, and every step's within STEP_TOL;
* the greedy tokens must be identical for all STEPS; the prompt is one whose reference
  path has no near-tie (smallest top-2 gap 0.06 for Qwen; a prompt with a 2e-4 gap at
  step 2 does flip there). Should a later change of the models bring a near-tie onto the
  path, the test tells it apart from a real error: tokens may then differ only from a
  step whose reference top-2 gap is below 2 * LOGIT_TOL, and never before step 16.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from tiny_models import deepseek_v2_config, qwen2_moe_config, random_model

from kt_core.cli.main import main
from kt_core.demo.tokenizer import build_demo_tokenizer
from kt_core.rules.shipped import find_rule_file
from kt_ops_cpuinfer.pool import physical_cores

PROMPT = "The quick brown fox jumps over the lazy dog"
STEPS = 16
LOGIT_TOL = 3e-2
STEP_TOL = 1e-1
MODELS = {
    "deepseek-v2-lite": (lambda vocab: deepseek_v2_config(vocab_size=vocab, q_lora_rank=None), "deepseek-v2-lite-cpu"),
    "qwen2-moe": (lambda vocab: qwen2_moe_config(vocab_size=vocab), "qwen2-moe-cpu"),
}


def cpu_engine_rules(shipped: str, tmp_path) -> str:
    """The shipped CPU rule file (routed experts on KExpertsCPU), with the pool pinned at 2 threads."""
    text = find_rule_file(shipped).read_text()
    old = 'generate_op: "KExpertsCPU"'
    assert text.count(old) == 1, f"{shipped} no longer puts the routed experts on the engine"
    path = tmp_path / f"{shipped}-2-threads.yaml"
    path.write_text(text.replace(old, old + "\n      threads: 2"))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: torch's intra-op threads only add barrier waits, which on a
    loaded 2-core machine cost milliseconds per op (most of this test's time otherwise)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def q8_gguf(kind: str, tmp_path, tokenizer, capsys) -> str:
    make_config, _ = MODELS[kind]
    model = random_model(make_config(len(tokenizer)), seed=1)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    gguf = tmp_path / "model-Q8_0.gguf"
    assert main(["convert", str(tmp_path / "hf"), str(gguf), "--type", "Q8_0"]) == 0
    capsys.readouterr()
    return str(gguf)


def generate(capsys, gguf: str, rules: str) -> list[int]:
    assert main(["generate", "--gguf", gguf, "--rules", rules, "--prompt", PROMPT, "--max-new-tokens", str(STEPS),
                 "--dtype", "float32", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def path_logits(gguf: str, rules: str, tokenizer, path: list[int]) -> tuple[list[torch.Tensor], type]:
    """Logits before each token of `path` (teacher-forced after the prompt), and the experts' backend class."""
    from kt_core.plugins import get_registry
    from kt_core.rules import load_rules
    from kt_core.runtime.generate import Session
    from kt_core.runtime.load import load_model
    from kt_core.runtime.model_source import open_model

    registry = get_registry()
    inputs = open_model(None, gguf, registry)
    loaded = load_model(inputs.config, load_rules(rules, registry), inputs.source, registry, dtype=torch.float32,
                        show_progress=False)
    session = Session(loaded.model, loaded.config, 64)
    logits, _ = session.prefill(tokenizer.encode(PROMPT))
    steps = [logits]
    for token in path[:-1]:
        steps.append(session.decode(token))
    return steps, type(loaded.model.model.layers[1].mlp.experts.generate_backend)


@pytest.mark.parametrize("kind", list(MODELS))
def test_cpu_engine_generates_the_torch_backend_tokens(kind, tmp_path, tokenizer, capsys):
    gguf = q8_gguf(kind, tmp_path, tokenizer, capsys)
    shipped = str(find_rule_file(MODELS[kind][1] + "-torch"))
    engine_rules = cpu_engine_rules(MODELS[kind][1], tmp_path)
    expected = generate(capsys, gguf, shipped)
    tokens = generate(capsys, gguf, engine_rules)

    ref_steps, ref_backend = path_logits(gguf, shipped, tokenizer, expected)
    engine_steps, engine_backend = path_logits(gguf, engine_rules, tokenizer, expected)
    assert (ref_backend.__name__, engine_backend.__name__) == ("KExpertsTorch", "KExpertsCPU")
    assert [int(step.argmax()) for step in ref_steps] == expected
    errors = [float((engine - ref).abs().max() / ref.abs().max()) for ref, engine in zip(ref_steps, engine_steps, strict=True)]
    assert statistics.median(errors) <= LOGIT_TOL, errors
    assert max(errors) <= STEP_TOL, errors

    first_difference = next((i for i, (a, b) in enumerate(zip(tokens, expected, strict=True)) if a != b), STEPS)
    if first_difference < STEPS:
        top2 = ref_steps[first_difference].topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < 2 * LOGIT_TOL * float(ref_steps[first_difference].abs().max()), (
            f"tokens differ at step {first_difference}, where the reference's top-2 gap {gap:.4f} is no near-tie"
        )
    assert first_difference >= 16


def test_bench_reports_the_engine_memory(tmp_path, tokenizer, capsys):
    """Expert weights are used in place, never copied: the Q8_0 blocks of the GGUF, and the
    float32 stacked tensors of the safetensors checkpoint transformers saved (gate and up are
    row ranges of its fused ``gate_up_proj``)."""
    gguf = q8_gguf("deepseek-v2-lite", tmp_path, tokenizer, capsys)
    config = deepseek_v2_config(vocab_size=len(tokenizer), q_lora_rank=None)
    layers = config.num_hidden_layers - config.first_k_dense_replace
    expert_bytes = 3 * config.n_routed_experts * config.moe_intermediate_size * config.hidden_size
    bench = ["bench", "--rules", "deepseek-v2-lite-cpu", "--prompt-len", "8", "--gen-len", "2", "--json"]

    assert main([*bench, "--gguf", gguf]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    engine = memory["backends_mib"]["KExpertsCPU"]
    # Q8_0 stores 34 bytes per 32 values; the report rounds to 0.1 MiB.
    assert engine["mapped"] == pytest.approx(layers * expert_bytes * 34 / 32 / 2**20, abs=0.06)
    assert engine["repacked"] == 0 and engine["scratch"] == 0
    # The layers' working buffers are the pool's, reported once (not per layer or per class;
    # a tiny model's round to 0.0 MiB).
    assert list(memory["shared_mib"]) == [f"cpuinfer pool scratch ({physical_cores()} threads)"]

    assert main([*bench, "--model", str(tmp_path / "hf")]) == 0
    engine = json.loads(capsys.readouterr().out)["memory"]["backends_mib"]["KExpertsCPU"]
    assert engine["mapped"] == pytest.approx(layers * expert_bytes * 4 / 2**20, abs=0.06)
    assert engine["repacked"] == 0
