"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kt_core.calling_thread import on_calling_thread


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` is greedy (top-k/top-p are then ignored)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # The range torch.Generator.manual_seed accepts (a larger one is an overflow deep in torch).
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits (-2**63 to 2**64-1), got {self.seed}")


def greedy_token(logits: torch.Tensor) -> int:
    """The id of the largest of `logits` (a vocabulary: small work for one thread, see `on_calling_thread`)."""
    with on_calling_thread(logits.numel()):
        return int(torch.argmax(logits))


class Sampler:
    """Samples token ids from [vocab] logits; owns the random generator so runs are reproducible."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.generator = torch.Generator()
        self.generator.manual_seed(config.seed if config.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        cfg = self.config
        if cfg.temperature == 0:
            return greedy_token(logits)
        logits = logits / cfg.temperature
        if cfg.top_k is not None and cfg.top_k < logits.numel():
            kth = torch.topk(logits, cfg.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p is not None and cfg.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - sorted_probs >= cfg.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=self.generator))
