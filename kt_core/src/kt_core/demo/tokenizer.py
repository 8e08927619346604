"""A small byte-level BPE tokenizer, trained deterministically on built-in text.

The demo model and the tests need a real tokenizer (with special tokens and a chat
template) without downloading one; training a few hundred merges on a fixed corpus takes
milliseconds and always gives the same vocabulary.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kt_core.weights.gguf_tokenizer import PRE_TOKENIZER_SPLITS

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_CORPUS = """\
Mixture-of-Experts language models route every token to a few experts out of many.
The experts hold most of the weights, so they can live in system memory and be computed
by the CPU, while attention and the dense layers run on a GPU when there is one.
Rules written in YAML decide, module by module, which operator replaces which part of
the model and on which device it runs. The first rule that matches a module decides it.
Weights come from GGUF files, quantized in blocks, or from safetensors checkpoints.
Hello! How are you today? I am a tiny model with random weights: my words are noise,
but the path they take through the injected operators is the real one.
def forward(x): return experts(x) + shared(x)  # 0123456789
"""


def build_demo_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A DeepSeek-style byte-level BPE tokenizer with BOS/EOS and a chat template."""
    tok = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS["deepseek-llm"]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 8, trainer)
    tok.add_special_tokens([AddedToken(BOS, special=True, normalized=False), AddedToken(EOS, special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, add_bos_token=True, chat_template=CHAT_TEMPLATE
    )
