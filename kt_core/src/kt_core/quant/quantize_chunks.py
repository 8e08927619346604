"""Running a block encoder over a whole tensor: chunks, and parallelism across chunks.

The encoders are long sequences of small vectorized torch ops (the K-quant searches run
a few hundred per chunk). Left to torch's intra-op OpenMP threads, every one of those
ops is a fork/join across all cores; when anything else competes for the cores (a
parallel test run, a second conversion) the spinning barriers collapse throughput by an
order of magnitude. So the chunks are encoded by a small pool of Python threads instead,
each running torch single-threaded: torch releases the GIL inside every op, the chunks
are independent, and a busy core then only slows the thread that is on it.

Memory stays bounded: chunks are cut lazily, one per worker at a time, and a
non-contiguous tensor is copied one slab of rows at a time, never as a whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


def encode_in_chunks(
    tensor: torch.Tensor,
    out_blocks: torch.Tensor,
    block_size: int,
    chunk_elements: int,
    encode: Callable[[torch.Tensor], torch.Tensor],
    check: Callable[[torch.Tensor, int], None],
) -> None:
    """Encode every block of `tensor` into the rows of `out_blocks` (n_blocks, type_size).

    `encode` maps float32 blocks (n, block_size) to bytes (n, type_size); `check` sees
    each float32 chunk with the index of its first block first and may raise. Blocks are
    numbered in row-major order of `tensor`. Uses as many worker threads as torch's
    intra-op thread setting allows, and leaves that setting as it found it.
    """
    per_chunk = max(1, chunk_elements // block_size)
    rows_per_slab = max(1, chunk_elements // tensor.shape[-1])
    n_chunks = -(-out_blocks.shape[0] // per_chunk)
    chunks = _Chunks(_cut(tensor, block_size, rows_per_slab, per_chunk))

    def work() -> None:
        with torch.inference_mode():
            while (item := chunks.next()) is not None:
                first, blocks = item
                values = blocks.to(device="cpu", dtype=torch.float32).contiguous()
                check(values, first)
                out_blocks[first : first + values.shape[0]] = encode(values)

    workers = min(torch.get_num_threads(), n_chunks)
    with _single_threaded_ops():
        if workers <= 1:
            work()
            return
        with ThreadPoolExecutor(
            workers, thread_name_prefix="kt-quantize", initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            futures = [pool.submit(work) for _ in range(workers)]
            try:
                for future in futures:
                    future.result()
            finally:
                chunks.stop()


class _Chunks:
    """A chunk iterator shared by the workers; `stop` makes them all finish early."""

    def __init__(self, source: Iterator[tuple[int, torch.Tensor]]) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._stopped = False

    def next(self) -> tuple[int, torch.Tensor] | None:
        with self._lock:
            if self._stopped:
                return None
            return next(self._source, None)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


def _cut(
    tensor: torch.Tensor, block_size: int, rows_per_slab: int, per_chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of first block, blocks (n, block_size) in the source dtype), in order."""
    done = 0
    for slab in _row_slabs(tensor, rows_per_slab):
        blocks = slab.reshape(-1, block_size)
        for start in range(0, blocks.shape[0], per_chunk):
            chunk = blocks[start : start + per_chunk]
            yield done, chunk
            done += chunk.shape[0]


def _row_slabs(tensor: torch.Tensor, max_rows: int) -> Iterator[torch.Tensor]:
    """The tensor as consecutive 2-D slabs of at most `max_rows` rows, in row-major order.

    A contiguous tensor is only viewed. A non-contiguous one (a transposed or sliced
    weight) is walked along its leading dimensions so that each slab, not the whole
    tensor, is what gets copied; expert tensors can be several gigabytes.
    """
    if tensor.dim() == 1:
        yield tensor.unsqueeze(0)
    elif tensor.is_contiguous() or tensor.dim() == 2:
        rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.is_contiguous() else tensor
        for start in range(0, rows.shape[0], max_rows):
            yield rows[start : start + max_rows]
    else:
        for sub in tensor:
            yield from _row_slabs(sub, max_rows)


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """Run torch ops single-threaded for the duration, then restore the thread setting.

    torch's setting is per thread once a thread has used it, but it also seeds threads
    that start later (our workers), so it is set here, in the calling thread, and put
    back afterwards.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
