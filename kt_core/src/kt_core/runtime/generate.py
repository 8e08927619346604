"""Prefill and decode with a static cache, gpt-fast style: two paths, nothing hidden.

`Session` holds one conversation's cache. `prefill` runs the new part of a prompt in one
forward call (the prefix already in the cache is reused, which is what keeps a chat
turn cheap); `decode` runs one token. `generate` strings them together with sampling,
stop conditions and a streaming callback, and times prefill and decode separately.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig, StaticCache

from kt_core.errors import KtUserError
from kt_core.runtime.sampling import Sampler, SamplingConfig


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int]
    text: str
    prefill_seconds: float
    decode_seconds: float
    stop_reason: str
    reused_prompt_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        new = self.prompt_tokens - self.reused_prompt_tokens
        return new / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes from prefill; each later one costs a decode step.
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


_ALLOCATION_FAILURE = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)
_REQUESTED_BYTES = re.compile(r"tried to allocate (\d+) bytes")


def _is_allocation_failure(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or bool(_ALLOCATION_FAILURE.search(str(exc)))


def _out_of_memory_message(exc: BaseException, tokens: int, max_length: int, cache_allocated: bool) -> str:
    """Say what ran out of memory in the terms the user controls (--max-length, the prompt).

    The cache's buffers are allocated on the first forward call, sized by --max-length, so a
    failure there is almost always a --max-length too large for the machine.
    """
    found = _REQUESTED_BYTES.search(str(exc))
    asked = f" ({int(found.group(1)) / 2**30:.1f} GiB asked for at once)" if found else ""
    if not cache_allocated:
        return (f"out of memory allocating the KV cache for --max-length {max_length}{asked}; "
                "lower --max-length (the longest prompt plus reply you need)")
    return f"out of memory running {tokens} prompt tokens{asked}; shorten the prompt or lower --max-length"


@dataclass
class Session:
    """A static KV cache and the tokens it holds, for one sequence.

    transformers' `StaticCache` allocates each layer's buffers (``max_length`` slots) on the
    first update, on the device and with the shape of what that layer's attention stores:
    a layer placed on ``cuda:1`` gets its cache there, and absorbed MLA's layers hold only
    the compressed latent. Nothing is reallocated afterwards; a shorter prefix is reused
    by cropping (`prefill`).
    """

    model: nn.Module
    config: PretrainedConfig
    max_length: int
    cached: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cache = StaticCache(config=self.config, max_cache_len=self.max_length)
        self.input_device = self.model.get_input_embeddings().weight.device

    def _forward(self, ids: Sequence[int], start: int) -> torch.Tensor:
        if start + len(ids) > self.max_length:
            raise KtUserError(
                f"the sequence would reach {start + len(ids)} tokens, beyond the cache size {self.max_length}; "
                "raise --max-length or shorten the prompt"
            )
        input_ids = torch.tensor([list(ids)], device=self.input_device)
        positions = torch.arange(start, start + len(ids), device=self.input_device)[None]
        cache_allocated = any(getattr(layer, "is_initialized", False) for layer in self.cache.layers)
        try:
            with torch.inference_mode():
                out = self.model(input_ids=input_ids, position_ids=positions, cache=self.cache, use_cache=True,
                                 logits_to_keep=1)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_allocation_failure(exc):
                raise
            raise KtUserError(_out_of_memory_message(exc, len(ids), self.max_length, cache_allocated)) from None
        return out.logits[0, -1]

    def _rewind(self, keep: int) -> None:
        drop = len(self.cached) - keep
        if drop > 0:
            for layer in self.cache.layers:
                if getattr(layer, "is_initialized", False):
                    layer.crop(-drop)
        self.cached = self.cached[:keep]

    def prefill(self, ids: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Logits after `ids`, computing only what the cache does not already hold; returns (logits, reused)."""
        if not ids:
            raise KtUserError("the prompt is empty")
        reuse = 0
        limit = min(len(ids) - 1, len(self.cached))  # at least one token must run to get logits
        while reuse < limit and self.cached[reuse] == ids[reuse]:
            reuse += 1
        self._rewind(reuse)
        logits = self._forward(ids[reuse:], reuse)
        self.cached = list(ids)
        return logits, reuse

    @property
    def full(self) -> bool:
        """No slot is left for another token: a decode step now would overflow the cache."""
        return len(self.cached) >= self.max_length

    def decode(self, token: int) -> torch.Tensor:
        logits = self._forward([token], len(self.cached))
        self.cached.append(token)
        return logits


def generate(
    session: Session,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode_text: Callable[[list[int]], str] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `prompt_ids`, streaming text through `on_text`.

    ``max_new_tokens == 0`` only prefills (the prompt enters the cache, nothing is generated).
    ``stop_reason`` says why it ended: ``"eos"``, ``"stop_string"``, ``"length"`` (the
    token budget) or ``"cache_full"`` (the session's cache has no slot left). A prompt that
    does not fit the cache at all is a `KtUserError` before anything is generated.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampler = Sampler(sampling)
    decode_text = decode_text or (lambda tokens: "")
    t0 = time.perf_counter()
    logits, reused = session.prefill(prompt_ids)
    if max_new_tokens == 0:
        return GenerationResult(len(prompt_ids), [], "", time.perf_counter() - t0, 0.0, "length", reused)
    token = sampler(logits)  # the first token is part of prefill's cost
    prefill_s = time.perf_counter() - t0
    tokens: list[int] = []
    emitted = ""
    stop_reason = "length"
    decode_start = time.perf_counter()
    while True:
        if token in eos_ids:
            stop_reason = "eos"
            break
        tokens.append(token)
        text = decode_text(tokens)
        hit = next((s for s in stop_strings if s in text), None)
        if hit is not None:
            text = text[: text.index(hit)]
            stop_reason = "stop_string"
        if on_text is not None and not text.endswith("\ufffd") and len(text) > len(emitted):
            # Hold back incomplete UTF-8 (shown as U+FFFD) until the next token completes it.
            on_text(text[len(emitted):])
            emitted = text
        if hit is not None or len(tokens) >= max_new_tokens:
            break
        if session.full:
            # The last token is generated but has no slot to be decoded in: stop here, with
            # what was streamed kept, rather than fail after the user has seen half a reply.
            stop_reason = "cache_full"
            break
        token = sampler(session.decode(token))
    decode_s = time.perf_counter() - decode_start
    text = decode_text(tokens)
    if stop_reason == "stop_string":
        hit = next(s for s in stop_strings if s in text)
        text = text[: text.index(hit)]
    if on_text is not None and len(text) > len(emitted):
        on_text(text[len(emitted):])
    return GenerationResult(len(prompt_ids), tokens, text, prefill_s, decode_s, stop_reason, reused)
