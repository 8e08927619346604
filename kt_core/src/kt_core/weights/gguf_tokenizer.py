"""A transformers tokenizer from GGUF ``tokenizer.ggml.*`` metadata, and that metadata from a tokenizer.

A GGUF file carries no ``tokenizer.json``: llama.cpp's converter stores the vocabulary
(``tokens``), each token's kind (``token_type``), the BPE ``merges``, the special token ids,
whether to add BOS/EOS, the chat template, and the *name* of the pre-tokenizer
(``tokenizer.ggml.pre``), whose regexes live in llama.cpp's source. kt's models
(DeepSeek, Qwen) all use byte-level BPE (``tokenizer.ggml.model == "gpt2"``), which is what
this module rebuilds, with the `tokenizers` library.

Why not transformers' own GGUF tokenizer conversion
(``transformers.integrations.gguf.convert_gguf_tokenizer``): it re-spells every token
outside the byte-level alphabet and skips such tokens when adding control tokens, so
DeepSeek's ``<｜begin▁of▁sentence｜>`` / ``<｜end▁of▁sentence｜>`` (full-width bars, ``▁``)
are no longer found under their own text: the wrapper then appends BOS/EOS as *new*
tokens with ids past the vocabulary. It also knows no split regex for ``deepseek-llm`` or
``deepseek-v3``. Its table of split regexes for other pre-tokenizer names is reused here as
a fallback.

The rebuilt tokenizer follows llama.cpp's reading of the file:

- every token keeps its stored spelling and id (normal tokens are stored byte-level
  spelled; control and user-defined tokens as their plain text);
- control tokens (type 3) become special added tokens, user-defined ones (type 4) plain
  added tokens, both matched whole before BPE as llama.cpp does;
- merges are split at the first space after the first character, as llama.cpp does;
- the pre-tokenizer is the named one's split regexes followed by byte-level mapping. For
  ``qwen2`` an NFC normalizer is added, as Qwen's own tokenizer has (llama.cpp skips it;
  the two differ only on text that is not NFC-normalized).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kt_core.errors import KtUserError

TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Character classes are written as escapes: several of their range ends are characters that
# Unicode normalization replaces (U+2126 OHM SIGN, U+212A KELVIN SIGN, Greek with oxia), and a
# normalized copy would silently change the ranges (``K-ℭ`` from U+004B spans most of Unicode).
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM_PUNCT = "!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002"
_CJK_HANGUL = "\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff"
_CJK_KANA = "\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff"
_ASCII_PUNCT = "!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~"

PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
    "deepseek-llm": (
        r"[\r\n]",
        r"\s?[" + _DEEPSEEK_LLM_LETTERS + "]+",
        r"\s?[" + _DEEPSEEK_LLM_PUNCT + "]+",
        r"\s+$",
        "[" + _CJK_HANGUL + "]+",
        r"\p{N}+",
    ),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[" + _CJK_KANA + "]+",
        "[" + _ASCII_PUNCT + r"][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}
"""Split regexes per ``tokenizer.ggml.pre`` name, as llama.cpp's ``llama-vocab.cpp`` (and the
models' own ``tokenizer.json``) define them, applied in order, each isolating its matches."""

_NFC_PRE = frozenset({"qwen2", "deepseek-r1-qwen"})
_IGNORE_MERGES_PRE = frozenset({"llama3", "llama-v3", "llama-bpe"})
"""llama.cpp looks a whole pre-token up in the vocabulary before merging only for these."""


# -- reading ----------------------------------------------------------------------------


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file's ``tokenizer.*`` metadata describes (byte-level BPE only).

    Carries the bos/eos/pad/unk tokens, llama.cpp's add-BOS/EOS flags and the chat
    template. Raises `KtUserError` for another tokenizer model, an unknown pre-tokenizer
    name, or missing vocabulary keys.
    """
    arch = metadata.get("general.architecture", "unknown")
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise KtUserError(
            f"GGUF tokenizer 'tokenizer.ggml.model' is {kind!r} (architecture {arch!r}); kt builds only byte-level "
            "BPE tokenizers ('gpt2')"
        )
    tokens = [str(t) for t in _required(metadata, "tokenizer.ggml.tokens", arch)]
    merges = _required(metadata, "tokenizer.ggml.merges", arch)
    types = list(metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise KtUserError(
            f"GGUF tokenizer metadata of architecture {arch!r} has {len(tokens)} tokens but {len(types)} token types"
        )
    pre = str(metadata.get("tokenizer.ggml.pre", "gpt-2"))
    if pre == "default":
        pre = "gpt-2"

    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[_split_merge(m) for m in merges],
            ignore_merges=pre in _IGNORE_MERGES_PRE,
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(pre, arch)
    if pre in _NFC_PRE:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if int(k) == TOKEN_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if int(k) == TOKEN_USER_DEFINED
        ]
    )

    special = {
        name: _token_at(tokens, metadata.get(f"tokenizer.ggml.{key}"))
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("pad_token", "padding_token_id"),
            ("unk_token", "unknown_token_id"),
        )
    }
    kwargs: dict[str, Any] = {k: v for k, v in special.items() if v is not None}
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        kwargs["chat_template"] = str(template)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def _required(metadata: Mapping[str, Any], key: str, arch: str) -> Sequence[Any]:
    value = metadata.get(key)
    if value is None:
        raise KtUserError(
            f"GGUF metadata lacks the required key {key!r} (architecture {arch!r}); the file carries no usable tokenizer"
        )
    if isinstance(value, int):
        raise KtUserError(f"GGUF metadata key {key!r} was read as a count ({value}), not its values")
    return value


def _split_merge(merge: str) -> tuple[str, str]:
    """``"a b"`` → ``("a", "b")``, splitting at the first space after the first character, as llama.cpp does."""
    pos = merge.find(" ", 1)
    if pos < 0:
        raise KtUserError(f"GGUF tokenizer merge {merge!r} has no space separating its two parts")
    return merge[:pos], merge[pos + 1 :]


def _token_at(tokens: Sequence[str], token_id: Any) -> str | None:
    if token_id is None:
        return None
    index = int(token_id)
    return tokens[index] if 0 <= index < len(tokens) else None


def _pre_tokenizer(pre: str, arch: str) -> pre_tokenizers.PreTokenizer:
    splits = PRE_TOKENIZER_SPLITS.get(pre) or _transformers_split(pre)
    if splits is None:
        known = sorted(set(PRE_TOKENIZER_SPLITS) | set(_transformers_splits()))
        raise KtUserError(
            f"GGUF tokenizer pre-tokenizer 'tokenizer.ggml.pre' is {pre!r} (architecture {arch!r}), which kt does not "
            f"know; known: {', '.join(known)}"
        )
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in splits
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _transformers_splits() -> Mapping[str, str]:
    """transformers' table of single split regexes by GGUF pre-tokenizer name (empty if it moved)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    return GGUF_PRE_TOKENIZER_SPLITS


def _transformers_split(pre: str) -> tuple[str, ...] | None:
    pattern = _transformers_splits().get(pre)
    return None if pattern is None else (pattern,)


# -- writing ----------------------------------------------------------------------------


def tokenizer_to_gguf_metadata(
    tokenizer: PreTrainedTokenizerBase, pre: str, *, vocab_size: int | None = None
) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata llama.cpp's converter writes for a byte-level BPE `tokenizer`.

    `pre` is the llama.cpp pre-tokenizer name (``"qwen2"``, ``"deepseek-v3"``…): the
    converter finds it by hashing a test encoding, which kt cannot repeat for an
    arbitrary tokenizer, so the model plugin states it. `vocab_size` pads the token list
    with unused ``[PAD<i>]`` tokens up to the model's embedding rows, as the converter does.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise KtUserError(f"{type(tokenizer).__name__} has no `tokenizers` backend; a fast tokenizer is needed")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise KtUserError(f"the tokenizer's model is {model.get('type')!r}; GGUF 'gpt2' tokenizers are BPE")
    vocab = backend.get_vocab(with_added_tokens=True)
    count = max(max(vocab.values()) + 1, vocab_size or 0)
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder

    tokens: list[str] = []
    types: list[int] = []
    for index in range(count):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(token)
        if index in added:
            looks_special = added[index].special or _looks_special(token)
            types.append(TOKEN_CONTROL if looks_special else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)

    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [_join_merge(m) for m in model.get("merges", [])],
    }
    for attr, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
        ("unk_token_id", "unknown_token_id"),
    ):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            md[f"tokenizer.ggml.{key}"] = value
    add_bos, add_eos = _added_special_tokens(tokenizer)
    md["tokenizer.ggml.add_bos_token"] = add_bos
    md["tokenizer.ggml.add_eos_token"] = add_eos
    md.update(_chat_templates(tokenizer))
    return md


def _looks_special(token: str) -> bool:
    """The converter's rule for added tokens that are control tokens even when not marked special."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def _join_merge(merge: str | Sequence[str]) -> str:
    return merge if isinstance(merge, str) else " ".join(merge)


def _added_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, found by encoding a probe (flags and post-processors vary)."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    if len(full) <= len(plain):
        return False, False
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[0] == bos and full[1 : 1 + len(plain)] == plain
    add_eos = eos is not None and full[-1] == eos and full[-1 - len(plain) : -1] == plain
    return add_bos, add_eos


def _chat_templates(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """``tokenizer.chat_template``, plus ``tokenizer.chat_template.<name>`` for named templates."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return {}
    if isinstance(template, str):
        return {"tokenizer.chat_template": template}
    md: dict[str, Any] = {}
    for name, text in dict(template).items():
        key = "tokenizer.chat_template" if name == "default" else f"tokenizer.chat_template.{name}"
        md[key] = text
    named = sorted(n for n in dict(template) if n != "default")
    if named:
        md["tokenizer.chat_templates"] = named
    return md


__all__ = [
    "PRE_TOKENIZER_SPLITS",
    "TOKEN_CONTROL",
    "TOKEN_NORMAL",
    "TOKEN_UNUSED",
    "TOKEN_USER_DEFINED",
    "tokenizer_from_gguf",
    "tokenizer_to_gguf_metadata",
]
