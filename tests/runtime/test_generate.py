"""`kt generate` end to end against transformers' own forward on the same weights.

Greedy tokens must be identical: the injected model computes in float32 like the
reference and differs only in summation order (errors ~1e-6 on logits of magnitude ~1),
far below the gaps between top logits of these random models (checked once per case
when writing the test; a near-tie would show up as a deterministic failure here, not a
flake, since both sides are deterministic).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODELS, hf_greedy, make_model_dir

from kt_core.cli.main import main
from kt_core.plugins import get_registry
from kt_core.runtime.generate import Session
from kt_core.runtime.model_source import open_model

PROMPT = "Mixture-of-Experts models route every token"
STEPS = 32
QWEN = ["qwen2-moe", "qwen3-moe"]
ALL = list(MODELS)


def kt_json(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ALL)
def test_generate_safetensors_matches_transformers(kind, tmp_path_factory, tokenizer, capsys):
    path, model, rules = make_model_dir(kind, tmp_path_factory, tokenizer)
    out = kt_json(capsys, "generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT,
                  "--max-new-tokens", str(STEPS), "--dtype", "float32", "--json")
    ids = tokenizer.encode(PROMPT)
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == hf_greedy(model, ids, STEPS)
    assert out["text"] == tokenizer.decode(out["tokens"], skip_special_tokens=True)
    assert out["decode_tokens_per_s"] > 0 and out["prefill_tokens_per_s"] > 0


@pytest.mark.parametrize("kind", ALL)
def test_generate_from_converted_gguf(kind, tmp_path_factory, tokenizer, capsys):
    path, model, rules = make_model_dir(kind, tmp_path_factory, tokenizer)
    ids = tokenizer.encode(PROMPT)
    expected = hf_greedy(model, ids, STEPS)
    f32 = path / "model-F32.gguf"
    assert main(["convert", str(path), str(f32), "--type", "F32"]) == 0
    capsys.readouterr()
    out = kt_json(capsys, "generate", "--gguf", str(f32), "--rules", rules, "--prompt", PROMPT,
                  "--max-new-tokens", str(STEPS), "--dtype", "float32", "--json")
    assert out["tokens"] == expected  # config and tokenizer came from the GGUF alone


@pytest.mark.parametrize("kind", ["qwen2-moe", "deepseek-v2-lite", "deepseek-v3"])
def test_q8_0_gguf_matches_transformers_on_dequantized_weights(kind, tmp_path_factory, tokenizer, capsys):
    path, model, rules = make_model_dir(kind, tmp_path_factory, tokenizer)
    q8 = path / "model-Q8_0.gguf"
    assert main(["convert", str(path), str(q8), "--type", "Q8_0"]) == 0
    capsys.readouterr()
    # Reference: transformers' model holding exactly the dequantized weights (gguf-py-tested dequantize).
    source = open_model(None, str(q8), get_registry()).source
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(source.load(name, dtype=torch.float32))
    ids = tokenizer.encode(PROMPT)
    # The -torch variant dequantizes the experts like the reference; the default rules' CPU engine
    # also quantizes activations, which tests/cpuinfer/test_cpuinfer_generate.py bounds on its own.
    out = kt_json(capsys, "generate", "--gguf", str(q8), "--rules", f"{rules}-torch", "--prompt", PROMPT,
                  "--max-new-tokens", "16", "--dtype", "float32", "--json")
    assert out["tokens"] == hf_greedy(model, ids, 16)


def test_prefix_reuse_gives_the_same_logits(tmp_path_factory, tokenizer):
    from kt_core.rules import load_rules
    from kt_core.rules.shipped import find_rule_file
    from kt_core.runtime.load import load_model

    path, model, rules = make_model_dir("qwen2-moe", tmp_path_factory, tokenizer)
    registry = get_registry()
    inputs = open_model(str(path), None, registry)
    loaded = load_model(inputs.config, load_rules(find_rule_file(rules), registry), inputs.source, registry,
                        dtype=torch.float32, show_progress=False)
    first = tokenizer.encode("User: hello there\n\nAssistant: hi")
    second = first + tokenizer.encode(" and more text after it")
    session = Session(loaded.model, loaded.config, 256)
    session.prefill(first)
    logits_reused, reused = session.prefill(second)
    assert reused == len(first)
    fresh, _ = Session(loaded.model, loaded.config, 256).prefill(second)
    torch.testing.assert_close(logits_reused, fresh, rtol=0, atol=1e-5)
    # A different continuation rewinds the cache to the common prefix.
    third = first[:4] + tokenizer.encode(" something else")
    logits_third, reused_third = session.prefill(third)
    assert reused_third == 4
    with torch.no_grad():
        expected = model(torch.tensor([third])).logits[0, -1]
    torch.testing.assert_close(logits_third, expected, rtol=0, atol=1e-4)


def test_sampling_options(tmp_path_factory, tokenizer, capsys):
    path, model, rules = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    base = ["generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT, "--max-new-tokens", "12",
            "--dtype", "float32", "--json"]
    greedy = kt_json(capsys, *base)["tokens"]
    assert kt_json(capsys, *base, "--temperature", "0.8", "--top-k", "1", "--seed", "3")["tokens"] == greedy
    assert kt_json(capsys, *base, "--temperature", "0.8", "--top-p", "0.000001", "--seed", "3")["tokens"] == greedy
    a = kt_json(capsys, *base, "--temperature", "1.5", "--seed", "7")["tokens"]
    b = kt_json(capsys, *base, "--temperature", "1.5", "--seed", "7")["tokens"]
    assert a == b  # seeded sampling is reproducible
    c = kt_json(capsys, *base, "--temperature", "1.5", "--seed", "8")["tokens"]
    assert c != a


def test_stop_string(tmp_path_factory, tokenizer, capsys):
    path, model, rules = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    base = ["generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT, "--max-new-tokens", "24",
            "--dtype", "float32", "--json"]
    full = kt_json(capsys, *base)
    stop = full["text"][5:8]
    cut = kt_json(capsys, *base, "--stop", stop)
    assert cut["stop_reason"] == "stop_string"
    assert cut["text"] == full["text"][: full["text"].index(stop)]


def test_bench_json(tmp_path_factory, tokenizer, capsys):
    path, _, rules = make_model_dir("qwen2-moe", tmp_path_factory, tokenizer)
    report = kt_json(capsys, "bench", "--model", str(path), "--rules", rules, "--prompt-len", "16", "--gen-len", "4",
                     "--dtype", "float32", "--json")
    assert {"prefill_tokens_per_s", "decode_tokens_per_s", "load_seconds", "peak_rss_mib"} <= set(report)
    assert report["decode_tokens_per_s"] > 0


def test_missing_weights_are_listed_in_one_error(tmp_path_factory, tokenizer, capsys):
    from safetensors.torch import load_file, save_file

    path, _, rules = make_model_dir("qwen2-moe", tmp_path_factory, tokenizer)
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(k for k in tensors if k.startswith("model.layers.1.self_attn."))
    for name in dropped:
        del tensors[name]
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, weights)
    assert main(["generate", "--model", str(path), "--rules", rules, "--prompt", "x", "--json"]) == 2
    err = capsys.readouterr().err
    assert f"missing tensors ({len(dropped)})" in err and dropped[0] in err
    assert "model.norm.weight: source has (3,), model expects (" in err


def test_all_kinds_have_shipped_rules():
    from kt_core.rules.shipped import shipped_rule_files

    assert {rules for _, _, rules in MODELS.values()} <= set(shipped_rule_files())


def _write_old_form_gguf(path, model, tokenizer):
    """An F32 GGUF in the older llama.cpp DeepSeek form: attn_kv_b instead of attn_k_b/attn_v_b."""
    from kt_core.convert import write_gguf
    from kt_core.weights.safetensors_source import SafetensorsSource

    registry = get_registry()
    family = registry.family_for_model_type("deepseek_v2")
    # The names of a current-form file, with each layer's attn_k_b/attn_v_b pair replaced by attn_kv_b.
    current = {n for m in family.name_map(model.config, None) for n in m.gguf_names}
    old_names = frozenset(
        {n for n in current if not n.endswith(("attn_k_b.weight", "attn_v_b.weight"))}
        | {f"blk.{i}.attn_kv_b.weight" for i in range(model.config.num_hidden_layers)}
    )
    old = path / "old-form.gguf"
    write_gguf(old, SafetensorsSource(path), model.config, registry, ggml_type="F32", tokenizer=tokenizer,
               name_map=family.name_map(model.config, old_names), show_progress=False)
    return old


def test_older_deepseek_gguf_with_attn_kv_b_loads(tmp_path_factory, tokenizer, capsys):
    """Older llama.cpp DeepSeek GGUFs carry attn_kv_b instead of the split attn_k_b/attn_v_b."""
    from kt_core.weights.gguf_file import open_gguf

    path, model, rules = make_model_dir("deepseek-v2", tmp_path_factory, tokenizer)
    old = _write_old_form_gguf(path, model, tokenizer)
    names = set(open_gguf(old).tensors)
    assert "blk.0.attn_kv_b.weight" in names and "blk.0.attn_k_b.weight" not in names
    out = kt_json(capsys, "generate", "--gguf", str(old), "--rules", rules, "--prompt", PROMPT,
                  "--max-new-tokens", str(STEPS), "--dtype", "float32", "--json")
    assert out["tokens"] == hf_greedy(model, tokenizer.encode(PROMPT), STEPS)


def test_two_gpu_rules_remapped_to_cpu_give_the_cpu_tokens(tmp_path_factory, tokenizer, capsys):
    """The shipped two-GPU file (transfer_map) and a tiny-model variant, both remapped to the CPU."""
    path, model, _ = make_model_dir("deepseek-v2-lite", tmp_path_factory, tokenizer)
    base = ["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "16", "--dtype", "float32", "--json"]
    cpu = kt_json(capsys, *base, "--rules", "deepseek-v2-lite-cpu")["tokens"]
    remap = ["--device-map", "cuda:0=cpu", "--device-map", "cuda:1=cpu"]
    # The shipped file splits DeepSeek-V2-Lite's 27 layers at 14: on a 3-layer model that is a user error.
    assert main([*base, "--rules", "deepseek-v2-lite-2gpu", *remap]) == 2
    assert "transfer_map names layer(s) [14], but the model has 3 layers" in capsys.readouterr().err
    assert kt_json(capsys, *base, "--rules", "deepseek-v2-lite-gpu", "--device-map", "cuda=cpu")["tokens"] == cpu
    # The same file with the split moved to layer 1 for the tiny model.
    from kt_core.rules.shipped import find_rule_file

    text = find_rule_file("deepseek-v2-lite-2gpu").read_text()
    tiny = text.replace("14: \"cuda:1\"", "1: \"cuda:1\"").replace("(0|[1-9]|1[0-3])", "(0)").replace(
        "(1[4-9]|[2-9][0-9])", "([1-9][0-9]*)")
    assert tiny != text
    tiny_rules = path / "tiny-2gpu.yaml"
    tiny_rules.write_text(tiny)
    assert kt_json(capsys, *base, "--rules", str(tiny_rules), *remap)["tokens"] == cpu


LOGIT_SOURCES = [(kind, "safetensors") for kind in ALL] + [(kind, "f32-gguf") for kind in ALL] + [
    ("deepseek-v2", "f32-gguf-attn_kv_b")
]


def _source_for(how: str, path, model, tokenizer, capsys):
    """The weights as a user would bring them: the safetensors dir, or a GGUF `kt convert` wrote."""
    if how == "safetensors":
        return open_model(str(path), None, get_registry())
    if how == "f32-gguf":
        gguf = path / "model-F32.gguf"
        assert main(["convert", str(path), str(gguf), "--type", "F32"]) == 0
        capsys.readouterr()
        return open_model(None, str(gguf), get_registry())
    assert how == "f32-gguf-attn_kv_b"
    return open_model(None, str(_write_old_form_gguf(path, model, tokenizer)), get_registry())


@pytest.mark.parametrize(("kind", "how"), LOGIT_SOURCES)
def test_loaded_model_logits_match_transformers_for_prompt_and_decode(kind, how, tmp_path_factory, tokenizer, capsys):
    """Through the whole runtime (meta build, rules, load from safetensors or GGUF, static cache).

    Tolerance: float32 on both sides (an F32 GGUF holds the same float32 values); absorbed
    MLA and grouped experts change summation order only, giving ~1e-6 differences on
    logits of magnitude ~1 — atol 1e-4 leaves wide headroom while any wrong weight, mask
    or cache slot shifts logits by >1e-2.
    """
    from kt_core.rules import load_rules
    from kt_core.rules.shipped import find_rule_file
    from kt_core.runtime.load import load_model

    path, model, rules = make_model_dir(kind, tmp_path_factory, tokenizer)
    registry = get_registry()
    inputs = _source_for(how, path, model, tokenizer, capsys)
    loaded = load_model(inputs.config, load_rules(find_rule_file(rules), registry), inputs.source, registry,
                        dtype=torch.float32, show_progress=False)
    ids = tokenizer.encode(PROMPT)
    session = Session(loaded.model, loaded.config, 128)
    logits, _ = session.prefill(ids)
    seq = list(ids)
    with torch.no_grad():
        for step in range(4):
            expected = model(torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4, msg=f"step {step}")
            token = int(expected.argmax())
            seq.append(token)
            logits = session.decode(token)


def test_chat_keeps_the_cache_between_turns(tmp_path_factory, tokenizer):
    import subprocess
    import sys

    path, _, rules = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    result = subprocess.run(
        [sys.executable, "-m", "kt_core.cli.main", "chat", "--model", str(path), "--rules", rules,
         "--max-new-tokens", "6", "--dtype", "float32"],
        input="hello there\nand a second question\n\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("kt> ") == 2
    reuse = [line for line in result.stderr.splitlines() if line.startswith("[reused")]
    assert len(reuse) == 2
    (reused_1, total_1), (reused_2, total_2) = (map(int, line.split()[1].split("/")) for line in reuse)
    assert reused_1 == 0
    # The whole first prompt is an unchanged prefix of the second: all of it comes from the cache
    # (the re-rendered first reply may differ from the sampled tokens, so it is recomputed).
    assert total_1 <= reused_2 < total_2


def test_demo_runs_from_an_empty_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KT_CACHE", str(tmp_path))
    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "KTransformersExperts [generate_op=KExpertsCPU, prefill_op=KExpertsCPU]" in out
    assert "decode" in out and "tok/s" in out
    assert len(list(tmp_path.glob("*.gguf"))) == 1
    assert main(["demo", "--max-new-tokens", "4"]) == 0  # second run reuses the cached file
    assert "building the demo model" not in capsys.readouterr().err


def test_demo_model_is_generated_deterministically(tmp_path, monkeypatch):
    """Two machines (two empty caches) build byte-identical demo GGUFs: same plan, same tokens."""
    import hashlib

    from kt_core.cli.demo_cmd import demo_model_path

    digests = []
    for cache in ("a", "b"):
        monkeypatch.setenv("KT_CACHE", str(tmp_path / cache))
        digests.append(hashlib.sha256(open(demo_model_path(), "rb").read()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("kind", ["deepseek-v2-lite", "qwen3-moe"])
def test_a_bfloat16_load_keeps_activations_and_cache_in_bfloat16(kind, tmp_path_factory, tokenizer):
    """Operators must take the model's dtype, not the float32 of the meta model's placeholders.

    A norm holding a float32 weight in a bfloat16 model promotes every activation after it
    (and the cache) to float32, unlike the transformers model it replaces.
    """
    from kt_core.rules import load_rules
    from kt_core.rules.shipped import find_rule_file
    from kt_core.runtime.load import load_model
    from kt_ops_cpuinfer.rms_norm import KRMSNormCPUInfer

    path, _, rules = make_model_dir(kind, tmp_path_factory, tokenizer)
    registry = get_registry()
    inputs = open_model(str(path), None, registry)
    loaded = load_model(inputs.config, load_rules(find_rule_file(rules), registry), inputs.source, registry,
                        dtype=torch.bfloat16, show_progress=False)
    norms = [m for m in loaded.model.modules() if isinstance(m, KRMSNormCPUInfer)]
    assert norms and all(m.weight.dtype == torch.bfloat16 for m in norms)
    seen = []
    hook = loaded.model.model.layers[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    session = Session(loaded.model, loaded.config, 64)
    logits, _ = session.prefill(tokenizer.encode(PROMPT))
    session.decode(int(logits.argmax()))
    hook.remove()
    assert all((out[0] if isinstance(out, tuple) else out).dtype == torch.bfloat16 for out in seen)
    assert all(layer.keys.dtype == torch.bfloat16 for layer in session.cache.layers)


@pytest.mark.parametrize("kind", ["deepseek-v2", "deepseek-v2-lite", "deepseek-v3"])
def test_shipped_cpu_rules_run_decode_attention_as_one_engine_job(kind, tmp_path_factory, tokenizer, monkeypatch):
    """The shipped `*-cpu` rules put every part of MLA on the engine, so decode takes the fused step.

    A rule edit that moves one part elsewhere silently costs ~30 torch ops per layer per
    token; this catches it.
    """
    from fused_attention_spy import count_fused_steps

    from kt_core.rules import load_rules
    from kt_core.rules.shipped import find_rule_file
    from kt_core.runtime.load import load_model

    calls = count_fused_steps(monkeypatch)
    path, model, rules = make_model_dir(kind, tmp_path_factory, tokenizer)
    registry = get_registry()
    inputs = open_model(str(path), None, registry)
    loaded = load_model(inputs.config, load_rules(find_rule_file(rules), registry), inputs.source, registry,
                        dtype=torch.float32, show_progress=False)
    session = Session(loaded.model, loaded.config, 64)
    ids = tokenizer.encode(PROMPT)
    logits, _ = session.prefill(ids)
    tokens = []
    for _ in range(4):
        tokens.append(int(logits.argmax()))
        logits = session.decode(tokens[-1])
    assert calls["fused"] == 4 * loaded.config.num_hidden_layers
    assert tokens == hf_greedy(model, ids, 4)
