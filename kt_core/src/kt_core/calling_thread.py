"""Small CPU torch ops on the calling thread, instead of waking torch's OpenMP workers.

kt sets ``OMP_WAIT_POLICY=PASSIVE`` so that torch's OpenMP workers sleep between parallel
regions instead of spinning on the cores the CPU engine computes on. The price is paid by
any op torch decides to parallelize: it must wake a sleeping worker first, which on the
project's VMs costs about 100 µs — a decode step's router product (64 × 2048 in float32)
took 103-122 µs with two threads and 12-19 µs on one, and the greedy argmax over a 102400-
token vocabulary 420 µs. A decode step runs dozens of such ops, so the ones whose work is
known to be small run inside `on_calling_thread`, which drops torch to one thread for
their duration (setting and restoring the count costs about a microsecond).

Only for work the caller knows is small: a large matmul on one thread would be slower by
the number of cores. The thread count is process-global, so this belongs on the
single-threaded inference path, not in code that worker threads run concurrently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SMALL_WORK = 1 << 22
"""Multiply-adds (or elements touched) below which one thread beats waking a second: ~4M
is ~0.5 ms of one core's float32 work, several times the wake-up it saves."""


@contextlib.contextmanager
def on_calling_thread(work: int) -> Iterator[None]:
    """Run the block's torch ops on one thread when `work` (multiply-adds or elements) is small."""
    threads = torch.get_num_threads()
    if threads == 1 or work >= SMALL_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
