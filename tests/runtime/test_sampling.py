"""The sampler on known distributions: which tokens top-k/top-p allow, and that frequencies follow
softmax(logits / temperature).

Frequency bounds: with n = 4000 draws a probability p is estimated with standard error
sqrt(p(1-p)/n) <= 0.008; the 0.04 tolerance is 5 standard errors, and the seeds are fixed,
so the test is deterministic (no flakes) while a wrong temperature or renormalisation
(errors of 0.1 and more on these distributions) fails it.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from kt_core.runtime.sampling import Sampler, SamplingConfig

PROBS = [0.4, 0.3, 0.2, 0.1]
LOGITS = torch.tensor([math.log(p) for p in PROBS])
DRAWS = 4000
TOL = 0.04


def frequencies(config: SamplingConfig, logits: torch.Tensor = LOGITS) -> list[float]:
    sampler = Sampler(config)
    counts = Counter(sampler(logits) for _ in range(DRAWS))
    return [counts[i] / DRAWS for i in range(logits.numel())]


def test_greedy_is_the_argmax_whatever_top_k_and_top_p():
    assert Sampler(SamplingConfig(top_k=3, top_p=0.5))(torch.tensor([0.1, 2.0, -1.0])) == 1


def test_temperature_one_samples_the_softmax():
    assert frequencies(SamplingConfig(temperature=1.0, seed=0)) == pytest.approx(PROBS, abs=TOL)


def test_temperature_sharpens_and_flattens():
    for temperature in (0.5, 2.0):
        expected = torch.softmax(LOGITS / temperature, dim=0).tolist()
        got = frequencies(SamplingConfig(temperature=temperature, seed=1))
        assert got == pytest.approx(expected, abs=TOL)


def test_top_k_keeps_the_k_most_likely_renormalised():
    got = frequencies(SamplingConfig(temperature=1.0, top_k=2, seed=2))
    assert got == pytest.approx([0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0], abs=TOL)
    assert got[2] == got[3] == 0.0


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # 0.4 < 0.5, 0.4 + 0.3 >= 0.5: the first two tokens stay.
    got = frequencies(SamplingConfig(temperature=1.0, top_p=0.5, seed=3))
    assert got == pytest.approx([0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0], abs=TOL)
    assert got[2] == got[3] == 0.0
    # A top_p below the most likely token's mass keeps only that token.
    assert frequencies(SamplingConfig(temperature=1.0, top_p=0.3, seed=3)) == [1.0, 0.0, 0.0, 0.0]


def test_the_seed_makes_runs_reproducible():
    config = SamplingConfig(temperature=1.0, seed=42)
    first, second = Sampler(config), Sampler(config)
    assert [first(LOGITS) for _ in range(50)] == [second(LOGITS) for _ in range(50)]
    other, again = Sampler(SamplingConfig(temperature=1.0, seed=43)), Sampler(config)
    assert [other(LOGITS) for _ in range(50)] != [again(LOGITS) for _ in range(50)]
