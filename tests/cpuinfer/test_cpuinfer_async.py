"""Asynchronous use of `KExpertsCPU`: submit returns at once, sync waits without the GIL,
layers queue on one pool, each holding its borrowed buffers until its sync."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from cpuinfer_refs import BlockSource, random_blocks
from test_cpuinfer_moe import KEY, loaded, moe_config, moe_source, routing

from kt_ops_cpuinfer.experts import KExpertsCPU
from kt_ops_cpuinfer.pool import get_pool


def big_layer(threads: int = 2) -> KExpertsCPU:
    """A layer whose prefill takes well over 50 ms on any machine: 8 experts of 1024 x 2048 at
    Q8_0 (random blocks: no quantizing cost), 128 tokens x 8 slots, about 13 GFLOP."""
    E, H, inter = 8, 1024, 2048
    rng = np.random.default_rng(0)
    shapes = {"gate_proj": (E, inter, H), "up_proj": (E, inter, H), "down_proj": (E, H, inter)}
    source = BlockSource({f"{KEY}.{n}": ("Q8_0", s, random_blocks(s, "Q8_0", rng)) for n, s in shapes.items()})
    return loaded(KExpertsCPU, source, moe_config(E, H, inter), threads=threads)


def test_submit_returns_before_the_work_is_done_and_sync_releases_the_gil():
    layer = big_layer()
    x = torch.randn(128, 1024) * 0.01
    ids = torch.arange(8).repeat(128, 1)
    weights = torch.full((128, 8), 0.125)
    expected = layer(x, ids, weights)
    pool = get_pool(2)
    before = pool.jobs_completed

    t0 = time.perf_counter()
    layer.submit(x, ids, weights)
    submit_s = time.perf_counter() - t0
    assert not layer.done()  # the engine is still computing: sync is needed
    # Meanwhile the caller runs Python; a second thread also runs during sync (GIL released).
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    t1 = time.perf_counter()
    out = layer.sync()
    sync_s = time.perf_counter() - t1
    stop.set()
    spinner.join()
    assert layer.done() and pool.jobs_completed >= before + 1
    assert submit_s < sync_s
    assert counter[0] > 1000, "the GIL was held while the engine worked"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_layers_queue_on_one_pool_and_keep_their_buffers_apart():
    E, H, inter = 4, 64, 32
    a_src, _ = moe_source(("Q8_0", "Q8_0", "Q8_0"), E, H, inter, seed=1)
    b_src, _ = moe_source(("Q4_0", "Q8_0", "Q4_0"), E, H, inter, seed=2)
    a = loaded(KExpertsCPU, a_src, moe_config(E, H, inter), threads=2)
    b = loaded(KExpertsCPU, b_src, moe_config(E, H, inter), threads=2)
    xa, xb = torch.randn(9, H), torch.randn(1, H)
    ra, rb = routing(9, E, 2, seed=1), routing(1, E, 3, seed=2)
    expected_a, expected_b = a(xa, *ra), b(xb, *rb)
    a.submit(xa, *ra)
    b.submit(xb, *rb)
    assert torch.equal(b.sync(), expected_b)  # synced in the other order
    assert torch.equal(a.sync(), expected_a)


def test_misuse_is_reported():
    E, H, inter = 4, 64, 32
    source, _ = moe_source(("Q8_0", "Q8_0", "Q8_0"), E, H, inter, seed=1)
    layer = loaded(KExpertsCPU, source, moe_config(E, H, inter))
    with pytest.raises(RuntimeError, match="without a submit"):
        layer.sync()
    ids, weights = routing(2, E, 2, seed=0)
    layer.submit(torch.randn(2, H), ids, weights)
    with pytest.raises(RuntimeError, match="awaits its sync"):
        layer.submit(torch.randn(2, H), ids, weights)
    layer.sync()
    with pytest.raises(ValueError, match=r"hidden states must be \[tokens, 64\]"):
        layer.submit(torch.randn(2, 65), ids, weights)
    unloaded = KExpertsCPU(KEY, source, moe_config(E, H, inter), None, "cpu")
    with pytest.raises(RuntimeError, match="before load"):
        unloaded.submit(torch.randn(2, H), ids, weights)


def test_a_one_thread_pool_has_no_workers_and_computes_in_sync():
    """threads=1 is the caller alone: submit queues the job, sync computes all of it."""
    E, H, inter = 4, 64, 32
    source, _ = moe_source(("Q4_0", "Q8_0", "Q8_0"), E, H, inter, seed=3)
    one = loaded(KExpertsCPU, source, moe_config(E, H, inter), threads=1)
    two = loaded(KExpertsCPU, source, moe_config(E, H, inter), threads=2)
    x, (ids, weights) = torch.randn(5, H), routing(5, E, 2, seed=3)
    one.submit(x, ids, weights)
    assert not one.done()  # nobody computes until the caller waits
    torch.testing.assert_close(one.sync(), two(x, ids, weights), rtol=0, atol=0)


@pytest.mark.parametrize("pool_threads", [1, 2])
def test_callers_waiting_on_one_pool_from_several_threads_get_their_own_results(pool_threads):
    """Only one waiting thread at a time computes as the pool's thread 0 (its scratch slot);
    the others wait and retry. Results must not mix whatever the timing, and with no
    workers at all (threads=1) every caller still gets its job run."""
    E, H, inter = 4, 64, 32
    layers, inputs, expected = [], [], []
    for seed in range(4):
        source, _ = moe_source(("Q8_0", "Q4_0", "Q8_0"), E, H, inter, seed=10 + seed)
        layer = loaded(KExpertsCPU, source, moe_config(E, H, inter), threads=pool_threads)
        x, route = torch.randn(3 + seed, H), routing(3 + seed, E, 2, seed=seed)
        layers.append(layer)
        inputs.append((x, *route))
        expected.append(layer(*inputs[-1]))
    failures: list[str] = []

    def hammer(i: int) -> None:
        for _ in range(200):
            if not torch.equal(layers[i](*inputs[i]), expected[i]):
                failures.append(f"layer {i}")
                return

    # Daemon threads with a bounded join: a deadlock fails the test instead of hanging it.
    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "callers deadlocked on the pool"
    assert not failures


def test_a_waiter_that_finds_thread_0_busy_still_gets_its_job_run():
    """threads=1: thread X syncs a long job A and computes it as thread 0; meanwhile the main
    thread syncs job B, queued behind A. When X leaves (A done), B must still be run: the
    main thread takes slot 0 over instead of sleeping forever."""
    a = big_layer(threads=1)
    E, H, inter = 4, 64, 32
    source, _ = moe_source(("Q8_0", "Q8_0", "Q8_0"), E, H, inter, seed=5)
    b = loaded(KExpertsCPU, source, moe_config(E, H, inter), threads=1)
    xa, ids_a, weights_a = torch.randn(128, 1024) * 0.01, torch.arange(8).repeat(128, 1), torch.full((128, 8), 0.125)
    xb, (ids_b, weights_b) = torch.randn(2, H), routing(2, E, 2, seed=5)
    expected_b = b(xb, ids_b, weights_b)
    a.submit(xa, ids_a, weights_a)
    b.submit(xb, ids_b, weights_b)
    helper = threading.Thread(target=a.sync, daemon=True)
    helper.start()
    time.sleep(0.02)  # X is now computing A (well over 50 ms of work) as thread 0
    result: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: result.append(b.sync()), daemon=True)
    waiter.start()
    waiter.join(timeout=120)
    helper.join(timeout=120)
    assert not waiter.is_alive(), "the second waiter was never given its job"
    torch.testing.assert_close(result[0], expected_b, rtol=0, atol=0)
