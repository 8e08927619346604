"""Where generation ends: the model's EOS token, `--max-new-tokens 0`.

(The stop-string case is in test_generate.py::test_stop_string.)
"""

from __future__ import annotations

import json

from conftest import hf_greedy, make_model_dir

from kt_core.cli.main import main

PROMPT = "Mixture-of-Experts models route every token"


def kt_json(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_generation_stops_at_the_config_eos_token(tmp_path_factory, tokenizer, capsys):
    """The EOS id comes from the model's config.json; the EOS token itself is not returned."""
    path, model, rules = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    expected = hf_greedy(model, tokenizer.encode(PROMPT), 12)
    # The first greedy token not seen before (and not the tokenizer's own EOS) becomes the EOS.
    stop_at = next(i for i in range(1, len(expected)) if expected[i] not in expected[:i])
    assert tokenizer.eos_token_id not in expected[: stop_at + 1]
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["eos_token_id"] = expected[stop_at]
    config_file.write_text(json.dumps(config))

    out = kt_json(capsys, "generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT,
                  "--max-new-tokens", "12", "--dtype", "float32", "--json")
    assert out["stop_reason"] == "eos"
    assert out["tokens"] == expected[:stop_at]


def test_zero_new_tokens_only_prefills(tmp_path_factory, tokenizer, capsys):
    path, _, rules = make_model_dir("qwen2-moe", tmp_path_factory, tokenizer)
    out = kt_json(capsys, "generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT,
                  "--max-new-tokens", "0", "--dtype", "float32", "--json")
    assert (out["tokens"], out["text"], out["stop_reason"]) == ([], "", "length")
    assert out["prompt_tokens"] == len(tokenizer.encode(PROMPT))


def test_a_full_cache_stops_generation_and_keeps_what_was_generated(tmp_path_factory, tokenizer, capsys):
    """With room for the prompt but not the whole reply, generation stops at the cache's end:
    the tokens so far are the greedy reference's prefix, and the reason says why."""
    path, model, rules = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    prompt = tokenizer.encode(PROMPT)
    max_length = len(prompt) + 4
    expected = hf_greedy(model, prompt, 12)
    assert main(["generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--max-length", str(max_length), "--dtype", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stop_reason"] == "cache_full"
    # The prompt fills len(prompt) slots, each decode step one more; the last token needs none.
    assert out["tokens"] == expected[: max_length - len(prompt) + 1]
    assert main(["generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--max-length", str(max_length), "--dtype", "float32"]) == 0
    assert "the KV cache is full" in capsys.readouterr().err
