"""What `--model` and `--gguf` point at: a config, a weight source and a tokenizer.

- ``--model DIR`` with safetensors: config, weights and tokenizer from the directory.
- ``--model FILE.gguf`` (or ``--gguf FILE`` alone): everything from the GGUF file — the
  config from its architecture metadata, the tokenizer from ``tokenizer.ggml.*``.
- ``--model DIR|NAME --gguf FILE``: weights from the GGUF; the config (and tokenizer, if
  the directory has one) from DIR or the built-in config NAME, which take precedence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from kt_core.errors import KtUserError
from kt_core.model_config import resolve_config
from kt_core.registry import Registry
from kt_core.weights.gguf_file import open_gguf
from kt_core.weights.gguf_source import GGUFSource, undecodable_tensors_error
from kt_core.weights.gguf_tokenizer import tokenizer_from_gguf
from kt_core.weights.safetensors_source import SafetensorsSource
from kt_core.weights.source import WeightSource

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class ModelInputs:
    config: PretrainedConfig
    source: WeightSource
    tokenizer: PreTrainedTokenizerBase | None
    description: str


def dir_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise KtUserError(f"{path}: cannot load the tokenizer: {exc}") from None


def open_model(model: str | None, gguf: str | None, registry: Registry) -> ModelInputs:
    """Resolve `--model`/`--gguf` into a config, a weight source and a tokenizer."""
    if model is not None and model.endswith(".gguf") and gguf is None:
        model, gguf = None, model
    if gguf is not None:
        return _open_gguf(Path(gguf), model, registry)
    if model is None:
        raise KtUserError("give --model (a model directory or a .gguf file) or --gguf FILE")
    path = Path(model)
    if path.is_dir():
        config = resolve_config(model, registry)
        if not any(path.glob("*.safetensors")):
            raise KtUserError(f"{path}: no *.safetensors weights here; give --gguf FILE for GGUF weights")
        return ModelInputs(config, SafetensorsSource(path), dir_tokenizer(path), str(path))
    resolve_config(model, registry)  # raises "did you mean" for unknown names
    raise KtUserError(f"{model!r} is a built-in config without weights; give the weights with --gguf FILE")


def _open_gguf(path: Path, model: str | None, registry: Registry) -> ModelInputs:
    if not path.exists():
        raise KtUserError(f"{path}: GGUF file not found")
    file = open_gguf(path)
    arch = file.architecture
    family = registry.family_for_gguf_architecture(arch or "")
    if family is None:
        known = sorted(a for f in registry.families.values() for a in f.gguf_architectures)
        raise KtUserError(
            f"{path}: architecture {arch!r} is not supported by any installed model plugin "
            f"(supported: {', '.join(known) or 'none'})"
        )
    tokenizer = None
    if model is not None:
        config = resolve_config(model, registry)
        if config.model_type not in family.hf_model_types:
            file.close()
            raise KtUserError(
                f"{path} holds a {arch!r} model ({' or '.join(family.hf_model_types)}), but --model {model} is a "
                f"{config.model_type!r} config: give the config that belongs to these weights, or only --gguf "
                "(the config is then read from the file)"
            )
        if Path(model).is_dir():
            tokenizer = dir_tokenizer(Path(model))
    else:
        config = family.config_from_gguf(file.metadata)
    if tokenizer is None and "tokenizer.ggml.tokens" in file.metadata:
        tokenizer = tokenizer_from_gguf(file.metadata)
    source = GGUFSource(file, family.name_map(config, frozenset(file.tensors)))
    error = undecodable_tensors_error(source, path)
    if error is not None:
        file.close()
        raise error
    return ModelInputs(config, source, tokenizer, file.description)
