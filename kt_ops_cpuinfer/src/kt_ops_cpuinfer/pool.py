"""The engine's worker pools: one persistent pool per thread count, shared by the layers.

A pool of `threads` computes with `threads - 1` C++ worker threads plus the thread that
waits for a job (`sync`, or a synchronous call), which runs queued tasks while it waits
instead of sleeping; so a synchronous call starts at once and the machine never runs more
compute threads than `threads`. Every layer that asks for the same thread count gets the
same pool, so a model with 60 MoE layers runs on `threads` threads, not 60 times as many;
jobs of different layers run one after the other in submission order. The layers' working
buffers are the pool's too, lent to each call (`scratch_memory`), so a long prompt leaves
one set of them behind, not one per layer.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from kt_ops_cpuinfer import _engine

_pools: dict[int, _engine.ThreadPool] = {}
_lock = threading.Lock()


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once).

    Two workers on one core's hyper-threads compete for the same execution units and the
    same memory bandwidth, so the default pool size is the number of distinct cores.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    cores: set[str] = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def get_pool(threads: int | None = None) -> _engine.ThreadPool:
    """The shared pool of `threads` compute threads (physical cores when None), started on first use."""
    count = physical_cores() if threads is None else int(threads)
    if count < 1:
        raise ValueError(f"the CPU engine needs at least one thread, got {count}")
    with _lock:
        pool = _pools.get(count)
        if pool is None:
            pool = _pools[count] = _engine.ThreadPool(count)
        return pool


def scratch_memory(pool: _engine.ThreadPool) -> tuple[tuple[str, int], ...]:
    """The pool's working buffers as `BackendMemory.shared`: each op on the pool reports them, a sum counts them once.

    They grow to the largest calls in flight at once (a long prompt's) and are then kept
    for the next calls; `release_scratch` gives back what no call holds.
    """
    return ((f"cpuinfer pool scratch ({pool.threads} threads)", int(pool.scratch_bytes)),)


def release_scratch() -> None:
    """Free the working buffers no call holds now, in every pool (after a long prompt, say)."""
    with _lock:
        pools = list(_pools.values())
    for pool in pools:
        pool.release_scratch()


def require_cpu(operator: str, key: str, device: object) -> None:
    """Refuse a placement off the CPU: the engine's pool computes in host memory only."""
    if getattr(device, "type", device) != "cpu":
        raise ValueError(f"{operator} at {key} runs on the CPU, but was placed on {device}; set its device to 'cpu'")
