"""Finding a model's transformers config and building the model on ``meta``.

MODEL on the command line is a config directory (``config.json`` inside), a path to a
``config.json``, or the Hugging Face repo id of a config that a model plugin ships (so
large models can be planned offline, without weights).
"""

from __future__ import annotations

import difflib
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kt_core.errors import KtUserError
from kt_core.registry import Registry


def _config_from_file(path: Path) -> PretrainedConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KtUserError(f"{path}: cannot read the model config: {exc}") from None
    model_type = data.get("model_type")
    if not model_type:
        raise KtUserError(f"{path}: the config has no 'model_type'; is this a transformers config.json?")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config_class = AutoConfig.for_model(model_type).__class__
            return config_class.from_dict({k: v for k, v in data.items() if k not in ("auto_map", "model_type")})
    except ValueError as exc:
        raise KtUserError(f"{path}: transformers cannot build a config of model_type {model_type!r}: {exc}") from None


def resolve_config(model: str, registry: Registry) -> PretrainedConfig:
    """The transformers config for MODEL (directory, config.json, or built-in repo id)."""
    path = Path(model)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise KtUserError(f"{path}: no config.json in this directory; MODEL must be a transformers model directory")
        return _config_from_file(config_file)
    if path.is_file() and path.suffix == ".json":
        return _config_from_file(path)
    builtins = registry.builtin_configs()
    if model in builtins:
        _, config_path = builtins[model]
        return _config_from_file(Path(config_path))
    message = f"model {model!r} is not a directory with a config.json, nor a built-in config"
    close = difflib.get_close_matches(model, list(builtins), n=1, cutoff=0.5)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if builtins:
        message += f" (built-in: {', '.join(sorted(builtins))})"
    else:
        message += " (no model plugin with built-in configs is installed)"
    raise KtUserError(message)


def build_meta_model(config: PretrainedConfig, registry: Registry, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformers causal-LM for `config` on the ``meta`` device: structure, no memory.

    Its placeholders have `dtype`, the dtype the model will be loaded in: operators read
    the replaced module's dtype from them (a norm multiplies by a weight of its module's
    dtype), and a float32 placeholder in a bfloat16 model would turn every activation
    after it, and the cache, into float32.
    """
    if registry.family_for_model_type(config.model_type) is None:
        known = sorted({t for f in registry.families.values() for t in f.hf_model_types})
        raise KtUserError(
            f"no installed model plugin supports model_type {config.model_type!r} "
            f"(supported: {', '.join(known) or 'none; install kt-models-deepseek or kt-models-qwen'})"
        )
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # transformers keeps its float32-only modules (routers) in float32 and records
        # `dtype` in config.dtype, as from_pretrained does.
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
