"""A tensor nothing loads stays on `meta`: the loader names it instead of failing later in forward.

The model is built on `meta`; buffers a module computes in its constructor (a rotary
embedding's ``inv_freq``) are not stored in checkpoints, so without a load-time RoPE
operator they would stay on `meta`.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_model_dir

from kt_core.cli.main import main
from kt_core.errors import KtUserError
from kt_core.plugins import get_registry
from kt_core.rules import load_rules
from kt_core.rules.shipped import find_rule_file
from kt_core.runtime.load import load_model
from kt_core.runtime.model_source import open_model

ROPE_RULE = re.compile(r"# RoPE[^\n]*\n- match:\n    name: \"\^model\\\\\.rotary_emb\$\"\n  replace:\n    class: [^\n]+\n")


def rules_without_rope(tmp_path) -> str:
    text = find_rule_file("qwen3-moe-cpu-torch").read_text()
    stripped, count = ROPE_RULE.subn("", text)
    assert count == 1, "the shipped file's RoPE rule changed; update ROPE_RULE"
    path = tmp_path / "no-rope.yaml"
    path.write_text(stripped)
    return str(path)


def test_buffers_left_on_meta_are_named(tmp_path_factory, tokenizer, tmp_path):
    path, _, _ = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    registry = get_registry()
    inputs = open_model(str(path), None, registry)
    rules = load_rules(rules_without_rope(tmp_path), registry)
    with pytest.raises(KtUserError) as info:
        load_model(inputs.config, rules, inputs.source, registry, dtype=torch.float32, show_progress=False)
    message = str(info.value)
    assert "still on the meta device: model.rotary_emb.inv_freq" in message
    assert "RotaryEmbedding" in message  # says which operator would compute it


def test_cli_reports_it_as_a_user_error(tmp_path_factory, tokenizer, tmp_path, capsys):
    path, _, _ = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    argv = ["generate", "--model", str(path), "--rules", rules_without_rope(tmp_path), "--prompt", "hi"]
    assert main(argv) == 2
    assert "model.rotary_emb.inv_freq" in capsys.readouterr().err
