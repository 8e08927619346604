"""From command-line arguments to a loaded model and a tokenizer (shared by generate/chat/bench)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kt_core.devices import DeviceMap
from kt_core.errors import KtUserError
from kt_core.plugins import get_registry
from kt_core.rules.loader import load_rules
from kt_core.rules.shipped import find_rule_file
from kt_core.runtime.load import LoadedModel, load_model
from kt_core.runtime.model_source import open_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    loaded: LoadedModel
    tokenizer: PreTrainedTokenizerBase
    load_seconds: float


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise KtUserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def open_runtime(
    *, model: str | None, gguf: str | None, rules: str, device_map: list[str], dtype: str, threads: int | None,
    quiet: bool = False,
) -> Runtime:
    """Load everything `kt generate`/`chat`/`bench` need, reporting warnings on stderr."""
    set_threads(threads)
    registry = get_registry()
    start = time.perf_counter()
    rule_set = load_rules(find_rule_file(rules), registry)  # validate rules before touching weights
    devices = DeviceMap.parse(device_map)
    inputs = open_model(model, gguf, registry)
    if inputs.tokenizer is None:
        raise KtUserError(f"{inputs.description}: no tokenizer found (a model directory needs tokenizer.json)")
    loaded = load_model(
        inputs.config, rule_set, inputs.source, registry,
        device_map=devices, dtype=DTYPES[dtype], show_progress=None if not quiet else False,
    )
    for warning in [str(d) for d in loaded.plan.diagnostics] + loaded.warnings:
        print(f"kt: warning: {warning}", file=sys.stderr)
    return Runtime(loaded, inputs.tokenizer, time.perf_counter() - start)


def eos_ids(tokenizer: PreTrainedTokenizerBase, config) -> list[int]:
    """Token ids that end generation: the tokenizer's EOS and the config's eos_token_id(s)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(e) for e in eos)
    return sorted(ids)
