"""The engine's working buffers belong to the pool and are lent to one call at a time.

Why it matters: owned per layer, they stayed allocated after a long prompt, about 100 MB
per DeepSeek-V2-Lite layer at 512 tokens. These tests pin the sharing down by the pool's
own byte count (exact, not timed): many layers leave one set of buffers behind, a call in
flight keeps its buffers through `release_scratch`, and synchronous ops hand theirs back.
"""

from __future__ import annotations

import pytest
import torch
from test_cpuinfer_moe import KEY, moe_config, moe_source, routing
from torch import nn
from transformers import PretrainedConfig

from kt_core.backends import BackendMemory
from kt_core.weights.source import StateDictSource
from kt_ops_cpuinfer.experts import KExpertsCPU
from kt_ops_cpuinfer.linear import KLinearCPUInfer
from kt_ops_cpuinfer.pool import get_pool, release_scratch

# A thread count no other test file uses, so this file's pool starts empty and nothing else
# borrows from it (pools are per thread count and process-wide).
THREADS = 3
E, H, INTER = 8, 256, 128


@pytest.fixture
def pool():
    pool = get_pool(THREADS)
    pool.release_scratch()
    assert pool.scratch_bytes == 0
    return pool


def layers(count: int) -> list[KExpertsCPU]:
    out = []
    for seed in range(count):
        source, _ = moe_source(("Q8_0", "Q4_K", "Q8_0"), E, H, INTER, seed=seed)
        layer = KExpertsCPU(KEY, source, moe_config(E, H, INTER), None, "cpu", threads=THREADS)
        layer.load()
        out.append(layer)
    return out


def test_many_layers_leave_one_set_of_buffers_and_report_it_once(pool):
    model = layers(6)
    x, (ids, weights) = torch.randn(64, H, dtype=torch.bfloat16), routing(64, E, 4, seed=3)
    first = model[0](x, ids, weights)
    after_one = pool.scratch_bytes
    # A 64-token batch of 4 experts each needs at least the float32 hidden rows (64 * 4 * INTER)
    # and the per-pair outputs (64 * 4 * H): the layer borrowed them from the pool.
    assert after_one >= 64 * 4 * (INTER + H) * 4
    outs = [layer(x, ids, weights) for layer in model]
    assert pool.scratch_bytes == after_one  # five more layers reused the same buffers
    assert torch.equal(outs[0], first)
    assert not torch.equal(outs[0], outs[1])  # distinct weights: each layer computed its own

    total = sum((layer.memory() for layer in model), BackendMemory())
    assert total.shared == ((f"cpuinfer pool scratch ({THREADS} threads)", after_one),)
    assert total.mapped == sum(layer.memory().mapped for layer in model)


def test_a_call_in_flight_keeps_its_buffers_through_release(pool):
    a, b = layers(2)
    x, (ids, weights) = torch.randn(32, H), routing(32, E, 3, seed=4)
    expected_a, expected_b = a(x, ids, weights), b(x, ids, weights)
    release_scratch()
    assert pool.scratch_bytes == 0  # synchronous calls gave everything back

    a.submit(x, ids, weights)
    release_scratch()  # a's buffers are lent: they stay
    assert pool.scratch_bytes > 0
    assert torch.equal(b(x, ids, weights), expected_b)  # b borrows its own meanwhile
    assert torch.equal(a.sync(), expected_a)
    pool.release_scratch()
    assert pool.scratch_bytes == 0


def test_a_linear_op_returns_its_buffers_after_each_call(pool):
    weight = torch.randn(96, 64)
    module = nn.Linear(64, 96, bias=False, device="meta")
    op = KLinearCPUInfer("proj", StateDictSource({"proj.weight": weight}), PretrainedConfig(), module, "cpu",
                         threads=THREADS)
    op.load()
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    y = op(x)
    grown = pool.scratch_bytes
    assert grown >= 40 * 96 * 4  # float32 results before rounding to bfloat16
    assert torch.equal(op(x[:8]), y[:8])  # a smaller call fits in the same buffers
    assert pool.scratch_bytes == grown
    pool.release_scratch()
    assert pool.scratch_bytes == 0
    torch.testing.assert_close(op(x), y, rtol=0, atol=0)
