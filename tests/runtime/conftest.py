"""Tiny models saved the way users bring them: a safetensors directory with a tokenizer."""

from __future__ import annotations

import pytest
import torch
from tiny_models import deepseek_v2_config, deepseek_v3_config, qwen2_moe_config, qwen3_moe_config, random_model

from kt_core.demo.tokenizer import build_demo_tokenizer

MODELS = {
    "deepseek-v2": (deepseek_v2_config, {}, "deepseek-v2-lite-cpu"),
    "deepseek-v2-lite": (deepseek_v2_config, {"q_lora_rank": None}, "deepseek-v2-lite-cpu"),
    "deepseek-v3": (deepseek_v3_config, {}, "deepseek-v3-cpu"),
    "qwen2-moe": (qwen2_moe_config, {}, "qwen2-moe-cpu"),
    "qwen3-moe": (qwen3_moe_config, {}, "qwen3-moe-cpu"),
}


@pytest.fixture(scope="session")
def tokenizer():
    return build_demo_tokenizer()


def make_model_dir(kind: str, tmp_path_factory, tokenizer):
    make_config, overrides, rules = MODELS[kind]
    config = make_config(vocab_size=len(tokenizer), **overrides)
    model = random_model(config, seed=1)
    with torch.no_grad():
        for module in model.modules():
            # transformers initialises V3's routing bias (a buffer) to zero; a non-zero one makes the
            # end-to-end tests see whether it is stored, read from every format and used in routing.
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, rules


def hf_greedy(model: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    """The independent reference: transformers' own forward over the whole sequence, argmax."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]
