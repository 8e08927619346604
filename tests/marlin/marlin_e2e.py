"""Helpers of the Marlin end-to-end tests: tiny variants of the shipped Marlin rule files
and the int4-dequantized reference model they are compared with."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tiny_models import deepseek_v2_config, qwen2_moe_config

from kt_core.devices import DeviceMap
from kt_core.model_config import build_meta_model
from kt_core.planner import plan
from kt_core.plugins import get_registry
from kt_core.rules import load_rules
from kt_core.rules.shipped import find_rule_file
from kt_ops_marlin.int4 import quantize_int4

PROMPT = "Mixture-of-Experts models route every token"

CASES = {
    # kind: (config, shipped rules, substitutions making them fit the tiny model). The tiny
    # models have K = 64 (hidden), 32 (experts), 96 (DeepSeek's dense layer) and 48 (Qwen's
    # shared expert): groups of 32 fit DeepSeek; Qwen runs per-channel (K = 48 is padded on
    # the CPU path). The GPU-experts rule is narrowed to the first MoE layer so the other
    # MoE layer keeps its CPU experts.
    "deepseek-v2-lite": (
        lambda **kw: deepseek_v2_config(q_lora_rank=None, **kw),
        "deepseek-v2-lite-gpu-marlin",
        {"group_size: 128": "group_size: 32", "group_size: 64": "group_size: 32", "([1-4])": "(1)"},
    ),
    "qwen2-moe": (qwen2_moe_config, "qwen2-moe-gpu-marlin", {"group_size: 128": "group_size: -1", "([01])": "(0)"}),
}


def save_model_dir(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    """The model saved the way users bring it: safetensors plus tokenizer."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_rules(name: str, substitutions: dict[str, str], path: Path) -> Path:
    """The shipped rule file `name` with `substitutions` applied, written to `path`."""
    text = find_rule_file(name).read_text()
    for old, new in substitutions.items():
        assert old in text, f"{name} no longer contains {old!r}; update the tiny-model substitutions"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def torch_rules(marlin_rules: Path, path: Path) -> Path:
    """The same rules with the int4 backends replaced by the PyTorch ones (and their kwargs dropped)."""
    text = marlin_rules.read_text().replace("KLinearMarlin", "KLinearTorch").replace("KExpertsMarlin", "KExpertsTorch")
    path.write_text(re.sub(r"(?m)^\s*group_size: .*\n", "", text))
    return path


def int4_tensors(config, rules_path: Path) -> dict[str, int]:
    """Every tensor an int4 backend reads under these rules, with its group size (from kt's own plan)."""
    registry = get_registry()
    rules = load_rules(rules_path, registry)
    result = plan(build_meta_model(config, registry), rules, device_map=DeviceMap.parse(["cuda=cpu"]))
    tensors: dict[str, int] = {}
    for d in result.decisions:
        if d.origin != "rule" or "generate_op" not in d.kwargs:
            continue
        op = registry.resolve_operator(d.kwargs["generate_op"]).name
        group = int(rules.rules[d.rule].backend_kwargs.get(op, {}).get("group_size", 128))
        if op == "KLinearMarlin":
            tensors[f"{d.module}.weight"] = group
        elif op == "KExpertsMarlin":
            tensors[f"{d.module}.gate_up_proj"] = group
            tensors[f"{d.module}.down_proj"] = group
    return tensors


def reference_dir(model: torch.nn.Module, tensors: dict[str, int], tokenizer, path: Path) -> Path:
    """`model` with each of `tensors` replaced by its int4 values dequantized to float32, saved to `path`."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, group in tensors.items():
            params[name].copy_(quantize_int4(params[name], group).dequantize())
    return save_model_dir(model, tokenizer, path)
