"""Reading a model's hyperparameters from GGUF metadata, for the model plugins.

llama.cpp's converter writes a model's hyperparameters under its architecture name
(``deepseek2.block_count``, ``qwen3moe.expert_count``…) and the tokenizer's under
``tokenizer.ggml.*``. Every model plugin turns those keys into a transformers config, and
every one needs the same things: keys looked up by their short name, an error that names
the full key and the architecture when a required one is missing (so a user can tell an
incomplete file from an unsupported one), the vocabulary size and special token ids, and
the generic ``rope.*`` keys, which llama.cpp reads the same way for every architecture.
They live here so that the plugins read files alike and report problems in the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kt_core.errors import KtUserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_TOKEN_ID_KEYS = (
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("pad_token_id", "padding_token_id"),
)
"""transformers config field ↔ ``tokenizer.ggml.*`` key (llama.cpp says "padding", transformers "pad")."""


class ArchMetadata:
    """The ``<arch>.*`` keys of a GGUF file by their short name, with errors that name the missing key.

    It does not check ``general.architecture``: plugins accept different sets of
    architectures (and differ on files that lack the key), so each checks that itself
    before reading through this class.
    """

    def __init__(self, metadata: Mapping[str, Any], arch: str) -> None:
        self.metadata = metadata
        """All of the file's metadata, including keys outside the architecture's namespace."""
        self.arch = arch

    def get(self, key: str, default: Any = None) -> Any:
        """``<arch>.<key>``, or `default` where the file lacks it (for keys llama.cpp treats as optional)."""
        return self.metadata.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        """``<arch>.<key>``; a `KtUserError` naming the key and architecture where the file lacks it."""
        value = self.get(key)
        if value is None:
            raise KtUserError(
                f"GGUF metadata lacks the required key '{self.arch}.{key}' (architecture {self.arch!r}); "
                "the file is incomplete or was written by a converter kt does not know"
            )
        return value

    def as_int(self, key: str) -> int:
        """A required key as an int (GGUF stores counts in several integer widths)."""
        return int(self.require(key))

    def as_float(self, key: str) -> float:
        """A required key as a float."""
        return float(self.require(key))

    def vocab_size(self) -> int:
        """``<arch>.vocab_size`` (kt writes it), else the token count, as llama.cpp falls back.

        The llama.cpp converter does not always write ``vocab_size``; the tokenizer's token
        list then gives it (some readers store only the list's length, hence the int case).
        """
        size = self.get("vocab_size")
        if size is not None:
            return int(size)
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise KtUserError(
                f"GGUF metadata has neither '{self.arch}.vocab_size' nor 'tokenizer.ggml.tokens' "
                f"(architecture {self.arch!r}); the vocabulary size cannot be known"
            )
        return tokens if isinstance(tokens, int) else len(tokens)


def token_ids(metadata: Mapping[str, Any]) -> dict[str, int]:
    """bos/eos/pad ids for generation, from the tokenizer metadata where present.

    Only the ids the file has are returned, so the config classes keep their own defaults
    for the others (a ``**`` into the config constructor).
    """
    ids: dict[str, int] = {}
    for name, key in _TOKEN_ID_KEYS:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            ids[name] = int(value)
    return ids


def rope_parameters(md: ArchMetadata, models: str) -> dict[str, Any]:
    """transformers ``rope_parameters`` from llama.cpp's ``<arch>.rope.*`` keys.

    ``rope.scaling.type`` ``none`` (or no key) is the default rope, ``linear`` linear
    scaling. For ``yarn`` this gives what every architecture stores (factor, original
    context length); the YaRN extras are stored differently per architecture (DeepSeek
    keeps its mscale as a log multiplier), so the plugin adds them. `models` names the
    plugin's models in the error for any other type (``"DeepSeek models"``).
    """
    theta = float(md.get("rope.freq_base", 10000.0))
    kind = md.get("rope.scaling.type", "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    factor = md.as_float("rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind != "yarn":
        raise KtUserError(
            f"GGUF metadata key '{md.arch}.rope.scaling.type' is {kind!r}; {models} use 'yarn', 'linear' or 'none'"
        )
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": md.as_int("rope.scaling.original_context_length"),
    }


def rope_metadata(config: PretrainedConfig, arch: str) -> dict[str, Any]:
    """The ``<arch>.rope.*`` keys for `config`'s ``rope_parameters``: the inverse of `rope_parameters`.

    llama.cpp runs only default, linear and YaRN rope, so other types are refused rather
    than written as something they are not. As in `rope_parameters`, the plugin adds its
    architecture's YaRN extras after these keys.
    """
    p = f"{arch}.rope."
    rope = dict(config.rope_parameters or {})
    md: dict[str, Any] = {p + "freq_base": float(rope.get("rope_theta", 10000.0))}
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return md
    if kind not in ("linear", "yarn"):
        raise KtUserError(f"rope_type {kind!r} cannot be written to a {arch} GGUF (llama.cpp supports yarn and linear)")
    md[p + "scaling.type"] = kind
    md[p + "scaling.factor"] = float(rope["factor"])
    if kind == "yarn":
        md[p + "scaling.original_context_length"] = int(rope["original_max_position_embeddings"])
    return md


__all__ = ["ArchMetadata", "rope_metadata", "rope_parameters", "token_ids"]
