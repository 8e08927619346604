"""Host memory advice (Linux): huge pages for large outputs, page tables for mapped weights.

Dequantizing writes a fresh multi-gigabyte float tensor, and on Linux the first write to
each 4 KiB page of it takes a page fault that zeroes the page. Measured on the machines
kt targets, that first-touch cost alone caps a fresh output at about 2-4 GB/s, well below
what the decoders produce. Asking the kernel for 2 MiB transparent huge pages
(`madvise(MADV_HUGEPAGE)`) on the allocation before it is touched cuts the number of
faults 512-fold and lifts the cap to roughly 10-17 GB/s. Most distributions run THP in
"madvise" mode, so the advice is what makes the difference.

Reading has its own first-touch cost: an operator computing in place on a memory-mapped
GGUF maps each page when it first reads it, in decode whenever a token routes to an
expert no token used before, and a page of the file that is in no process's page tables
is the kernel's first choice to reclaim — proactively so where a reclaimer runs (the
project's Xeon VM runs DAMON with a "page out unmapped file pages" scheme). There, MoE
layers whose experts had been reclaimed took 18-86 ms instead of ~2.3 ms until their pages
were read back. `populate` maps a range at load (`MADV_POPULATE_READ`, Linux 5.14+), as
llama.cpp's `MAP_POPULATE` does, and reads one byte of each page, since on a VM the first
CPU access to a page costs something even once it is mapped: 0.3-0.7 s for 10 GB of cached
file there, or the time to read it from disk once. Only up to 80 % of the machine's memory is populated per process, so a
model larger than memory still streams from its file instead of thrashing at load.

The advice is best effort: on other platforms, for accelerator or small tensors, or if
the call fails, the tensor is an ordinary `torch.empty` (or the mapping stays lazy) and
only the speed differs.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Callable

import numpy as np
import torch

_HUGE_PAGE_BYTES = 2 << 20
_PAGE_BYTES = mmap.PAGESIZE
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_POPULATE_SHARE = 0.8
_populated = 0  # bytes this process has populated so far


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's `madvise`, or None where it (or MADV_HUGEPAGE) is unavailable."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized 1-D tensor; large CPU ones are advised to use huge pages.

    Only the whole 2 MiB pages inside the allocation are advised, so neighbouring
    allocations are never affected.
    """
    tensor = torch.empty(numel, dtype=dtype, device=device)
    madvise = _madvise()
    nbytes = tensor.numel() * tensor.element_size()
    if madvise is None or device.type != "cpu" or nbytes < 2 * _HUGE_PAGE_BYTES:
        return tensor
    start = tensor.data_ptr()
    first_page = -(-start // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
    end_page = (start + nbytes) // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
    if end_page > first_page:
        madvise(first_page, end_page - first_page, mmap.MADV_HUGEPAGE)
    return tensor


@functools.cache
def _memory_bytes() -> int:
    """MemTotal from /proc/meminfo (0 where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def populate(address: int, nbytes: int) -> bool:
    """Map the pages of [address, address + nbytes) now, reading any that are not cached.

    For weights an engine reads in place from a memory map. Returns whether it was done:
    False on other platforms, kernels older than 5.14, or once this process has populated
    80 % of the machine's memory (the rest of a larger model stays lazily mapped).
    """
    global _populated
    madvise = _madvise()
    if madvise is None or nbytes <= 0 or _populated + nbytes > _POPULATE_SHARE * _memory_bytes():
        return False
    start = address // _PAGE_BYTES * _PAGE_BYTES
    if madvise(start, address + nbytes - start, _MADV_POPULATE_READ) != 0:
        return False
    # One read per page as well: the first CPU access to each page still costs something
    # below the page tables on a VM (a layer's first use after load ran at 3.2 ms instead
    # of 1.8 there, 42 ms right after a reclaim), 0.24 s for 10 GB of cached file at load.
    pages = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=np.uint8)[::_PAGE_BYTES]
    int(pages.sum(dtype=np.uint64))
    _populated += nbytes
    return True
