"""Byte-level BPE tokenizers ⇄ GGUF ``tokenizer.*`` metadata.

The tokenizers are trained here on a small corpus with the `tokenizers` library (a few
dozen merges), shaped like DeepSeek-V3's (adds BOS, full-width-bar special tokens) and
Qwen2's (no BOS, ``<|im_start|>`` specials, NFC), then go to metadata and back.
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kt_core.errors import KtUserError
from kt_core.weights.gguf_tokenizer import (
    PRE_TOKENIZER_SPLITS,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    tokenizer_from_gguf,
    tokenizer_to_gguf_metadata,
)

DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "hello world, hello there! the quick brown fox jumps over the lazy dog 12345 67890",
    "naïve café résumé — Ünïcödé; 日本語のテキスト、カタカナ 中文字符 한국어 😀🚀 don't won't it's",
    "def f(x):\n    return x * 2  # comment\n\n\tindent",
]
TEXTS = [
    "hello world",
    "The quick brown fox, 1234567 and 3.14!",
    "naïve café 日本語のテキスト 中文 한국어 😀🚀✅",
    "  leading spaces\n\nand\ttabs  ",
    "e\u0301 (decomposed) vs é",
    "<think>reasoning</think> answer",
]


def _train(pre: str, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(specials) + 60,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_tokens(
        [
            AddedToken("<think>", special=False, normalized=False),
            AddedToken("</think>", special=False, normalized=False),
        ]
    )
    return tok


@pytest.fixture(scope="module")
def deepseek_tokenizer() -> PreTrainedTokenizerFast:
    tok = _train("deepseek-v3", [DS_BOS, DS_EOS])
    tok.add_special_tokens(
        [
            AddedToken("<|im_start|>", special=True, normalized=False),
            AddedToken("<|im_end|>", special=True, normalized=False),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=DS_BOS, eos_token=DS_EOS, add_bos_token=True, chat_template=TEMPLATE
    )


@pytest.fixture(scope="module")
def qwen_tokenizer() -> PreTrainedTokenizerFast:
    tok = _train("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE
    )


CASES = [("deepseek_tokenizer", "deepseek-v3"), ("qwen_tokenizer", "qwen2")]


@pytest.mark.parametrize(("fixture", "pre"), CASES)
def test_encodings_survive_the_round_trip(request, fixture, pre):
    original = request.getfixturevalue(fixture)
    rebuilt = tokenizer_from_gguf(tokenizer_to_gguf_metadata(original, pre))
    for text in [*TEXTS, f"{original.eos_token}x<|im_start|>user\nhi<|im_end|>"]:
        for special in (True, False):
            expected = original.encode(text, add_special_tokens=special)
            assert rebuilt.encode(text, add_special_tokens=special) == expected, (text, special)
        ids = original.encode(text)
        assert rebuilt.decode(ids) == original.decode(ids)
        assert rebuilt.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(("fixture", "pre"), CASES)
def test_special_tokens_and_chat_template_survive(request, fixture, pre):
    original = request.getfixturevalue(fixture)
    rebuilt = tokenizer_from_gguf(tokenizer_to_gguf_metadata(original, pre))
    for attr in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(rebuilt, attr) == getattr(original, attr), attr
    assert rebuilt.chat_template == original.chat_template
    messages = [{"role": "user", "content": "hi 😀"}, {"role": "assistant", "content": "hello"}]
    assert rebuilt.apply_chat_template(messages, add_generation_prompt=True) == original.apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert len(rebuilt) == len(original)


def test_metadata_is_what_the_converter_writes(deepseek_tokenizer):
    md = tokenizer_to_gguf_metadata(deepseek_tokenizer, "deepseek-v3")
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "deepseek-v3"
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    kinds = dict(zip(tokens, types, strict=True))
    assert kinds[DS_BOS] == kinds[DS_EOS] == kinds["<|im_start|>"] == TOKEN_CONTROL
    assert kinds["<think>"] == TOKEN_USER_DEFINED
    assert kinds["Ġ"] == TOKEN_NORMAL  # byte-level spelling of " " is kept
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False
    assert md["tokenizer.chat_template"] == TEMPLATE
    merges = md["tokenizer.ggml.merges"]
    assert 20 <= len(merges) <= 80 and all(len(m.split(" ")) == 2 for m in merges)


def test_vocab_is_padded_with_unused_tokens(qwen_tokenizer):
    md = tokenizer_to_gguf_metadata(qwen_tokenizer, "qwen2", vocab_size=len(qwen_tokenizer) + 5)
    assert md["tokenizer.ggml.tokens"][-1] == f"[PAD{len(qwen_tokenizer) + 4}]"
    assert md["tokenizer.ggml.token_type"][-5:] == [TOKEN_UNUSED] * 5
    rebuilt = tokenizer_from_gguf(md)
    assert rebuilt.encode(TEXTS[2]) == qwen_tokenizer.encode(TEXTS[2])
    assert md["tokenizer.ggml.add_bos_token"] is False and "tokenizer.ggml.bos_token_id" not in md


def test_bos_added_by_a_post_processor_is_detected(deepseek_tokenizer):
    """tokenizer.json files often add BOS through a TemplateProcessing step with no add_bos flag."""
    backend = Tokenizer.from_str(deepseek_tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single=f"{DS_BOS} $A", special_tokens=[(DS_BOS, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=DS_BOS, eos_token=DS_EOS)
    assert tok.encode("hi")[0] == 0
    assert tokenizer_to_gguf_metadata(tok, "deepseek-v3")["tokenizer.ggml.add_bos_token"] is True


def test_deepseek_llm_splits_keep_their_unicode_ranges():
    """The letter class must use U+212A KELVIN SIGN; an ASCII ``K-ℭ`` range would swallow ``_``."""
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS["deepseek-llm"]]
    )
    pieces = [p for p, _ in pre.pre_tokenize_str("Hello world, x_y \u212a\u2126 世界 123")]
    # (U+0800..U+4E00 in the CJK split then cuts the space off " \u212a\u2126", as in DeepSeek's own tokenizer)
    assert pieces == ["Hello", " world", ",", " x", "_", "y", " ", "\u212a\u2126", " ", "世界", " ", "123"]


def test_unsupported_tokenizers_are_user_errors(qwen_tokenizer):
    md = tokenizer_to_gguf_metadata(qwen_tokenizer, "qwen2")
    with pytest.raises(KtUserError, match="'llama'"):
        tokenizer_from_gguf(md | {"tokenizer.ggml.model": "llama"})
    with pytest.raises(KtUserError, match="'no-such-pre'"):
        tokenizer_from_gguf(md | {"tokenizer.ggml.pre": "no-such-pre"})
    del md["tokenizer.ggml.merges"]
    with pytest.raises(KtUserError, match="tokenizer.ggml.merges"):
        tokenizer_from_gguf(md | {"general.architecture": "qwen2moe"})
