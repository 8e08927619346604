"""Allocation of large CPU output tensors backed by transparent huge pages (Linux).

Dequantizing writes a fresh multi-gigabyte float tensor, and on Linux the first write to
each 4 KiB page of it takes a page fault that zeroes the page. Measured on the machines
kt targets, that first-touch cost alone caps a fresh output at about 2-4 GB/s, well below
what the decoders produce. Asking the kernel for 2 MiB transparent huge pages
(`madvise(MADV_HUGEPAGE)`) on the allocation before it is touched cuts the number of
faults 512-fold and lifts the cap to roughly 10-17 GB/s. Most distributions run THP in
"madvise" mode, so the advice is what makes the difference.

The advice is best effort: on other platforms, for accelerator or small tensors, or if
the call fails, the tensor is an ordinary `torch.empty` and only the speed differs.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Callable

import torch

_HUGE_PAGE_BYTES = 2 << 20


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
