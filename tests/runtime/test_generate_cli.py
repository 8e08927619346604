"""`kt generate` as a user runs it: streamed text, --chat-template, --threads."""

from __future__ import annotations

import json

import torch
from conftest import hf_greedy, make_model_dir

from kt_core.cli.main import main

PROMPT = "Mixture-of-Experts models route every token"


def test_streamed_text_is_the_generated_text(tmp_path_factory, tokenizer, capsys):
    path, _, rules = make_model_dir("qwen2-moe", tmp_path_factory, tokenizer)
    base = ["generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT, "--max-new-tokens", "12",
            "--dtype", "float32"]
    assert main([*base, "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)
    assert main(base) == 0
    captured = capsys.readouterr()
    assert captured.out == reference["text"] + "\n"
    assert f"[{reference['prompt_tokens']} prompt tokens, 12 generated; prefill " in captured.err
    assert "decode" in captured.err and "tok/s]" in captured.err


def test_streaming_callback_gets_the_text_piece_by_piece(tmp_path_factory, tokenizer):
    from kt_core.plugins import get_registry
    from kt_core.rules import load_rules
    from kt_core.rules.shipped import find_rule_file
    from kt_core.runtime.generate import Session, generate
    from kt_core.runtime.load import load_model
    from kt_core.runtime.model_source import open_model
    from kt_core.runtime.sampling import SamplingConfig

    path, _, rules = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    registry = get_registry()
    inputs = open_model(str(path), None, registry)
    loaded = load_model(inputs.config, load_rules(find_rule_file(rules), registry), inputs.source, registry,
                        dtype=torch.float32, show_progress=False)
    pieces: list[str] = []
    result = generate(Session(loaded.model, loaded.config, 64), tokenizer.encode(PROMPT), max_new_tokens=10,
                      sampling=SamplingConfig(), decode_text=lambda ids: tokenizer.decode(ids), on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == result.text  # streamed as it came, nothing lost or repeated
    # A piece never ends in an incomplete UTF-8 sequence (U+FFFD): it is held back until the next token.
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_chat_template_wraps_the_prompt_as_a_user_message(tmp_path_factory, tokenizer, capsys):
    path, model, rules = make_model_dir("deepseek-v2-lite", tmp_path_factory, tokenizer)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=True)
    ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert len(ids) > len(tokenizer.encode(PROMPT))  # the template added its role markers
    assert main(["generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT, "--chat-template",
                 "--max-new-tokens", "8", "--dtype", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == hf_greedy(model, ids, 8)


def test_threads_sets_torch_threads(tmp_path_factory, tokenizer, capsys):
    path, _, rules = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(path), "--rules", rules, "--prompt", PROMPT, "--threads", "1",
                     "--max-new-tokens", "2", "--json"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


def test_loading_shows_a_progress_bar(tmp_path_factory, tokenizer, capsys):
    from kt_core.plugins import get_registry
    from kt_core.rules import load_rules
    from kt_core.rules.shipped import find_rule_file
    from kt_core.runtime.load import load_model
    from kt_core.runtime.model_source import open_model

    path, _, rules = make_model_dir("qwen2-moe", tmp_path_factory, tokenizer)
    registry = get_registry()
    inputs = open_model(str(path), None, registry)
    capsys.readouterr()
    loaded = load_model(inputs.config, load_rules(find_rule_file(rules), registry), inputs.source, registry,
                        dtype=torch.float32, show_progress=True)
    err = capsys.readouterr().err
    # tqdm redraws at most every 0.1 s and clears the bar at the end (leave=False): the first frame shows.
    assert "loading weights" in err and f"0/{len(loaded.operators)}" in err
