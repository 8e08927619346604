"""`kt_core.quant.host_memory.populate`: a memory-mapped range mapped at once, within a budget."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from kt_core.quant import host_memory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_READ) is Linux's")


def _mapped_bytes(address: int) -> int:
    """Rss of the mapping holding `address`: the bytes of it in this process's page tables."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the address")


@linux_only
def test_a_populated_file_mapping_is_in_the_page_tables(tmp_path):
    """A fresh file mapping is in no page table until read (so a reclaimer may drop its
    cached pages); after `populate` all of it is mapped, without one read by the caller."""
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    assert _mapped_bytes(mapped.ctypes.data) < 1 << 20
    assert host_memory.populate(mapped.ctypes.data + 100, mapped.nbytes - 100)  # an unaligned start works
    assert _mapped_bytes(mapped.ctypes.data) >= 8 << 20


@linux_only
def test_population_stops_at_the_memory_budget(monkeypatch):
    monkeypatch.setattr(host_memory, "_populated", 0)
    monkeypatch.setattr(host_memory, "_memory_bytes", lambda: 10 << 20)
    buffer = np.zeros(6 << 20, np.uint8)
    assert host_memory.populate(buffer.ctypes.data, buffer.nbytes)  # 6 MiB of an 8 MiB budget
    assert not host_memory.populate(buffer.ctypes.data, buffer.nbytes)  # would pass 80 % of 10 MiB
    assert host_memory._populated == 6 << 20
    assert not host_memory.populate(buffer.ctypes.data, 0)
