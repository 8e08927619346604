"""Sustained memory read bandwidth of this machine, measured the way a decode step reads weights.

Decoding one token of a large model streams every weight it touches from DRAM once, so
the roofline ``tokens/s <= read bandwidth / bytes touched per token`` needs the read
bandwidth *of this machine, with the threads the model uses, right now*: the benchmark
machines are shared virtual machines whose bandwidth moves with what the neighbours do,
so an assumed datasheet figure would be meaningless. `measure_read_bandwidth` reduces a
buffer far larger than the last-level cache (default 2 GiB against a 32 MiB L3) with
``torch.sum`` — a streaming, vectorized, multi-threaded read with no writes to speak of —
several times and reports the median.

`measure_gemv_bandwidth` is the second number the benchmark needs to explain itself: the
rate at which PyTorch's own bf16 matrix-vector product (``F.linear`` with one token, the
operation a decode step is made of) streams weights of the shape of an MoE expert. The
gap between the two is the cost of the kernel, not of the memory.

    python benchmarks/bandwidth.py --gib 2 --repeat 7

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

GIB = 2**30


@dataclass(frozen=True)
class BandwidthResult:
    """Read bandwidth over `repeat` passes; GB/s are 10^9 bytes per second."""

    method: str
    threads: int
    buffer_bytes: int
    repeat: int
    gbps_median: float
    gbps_max: float
    gbps_all: list[float]


def _median_result(method: str, threads: int, nbytes: int, seconds: list[float]) -> BandwidthResult:
    rates = [nbytes / s / 1e9 for s in seconds]
    return BandwidthResult(
        method=method,
        threads=threads,
        buffer_bytes=nbytes,
        repeat=len(seconds),
        gbps_median=round(statistics.median(rates), 2),
        gbps_max=round(max(rates), 2),
        gbps_all=[round(r, 2) for r in rates],
    )


def measure_read_bandwidth(gib: float = 2.0, repeat: int = 7, threads: int | None = None) -> BandwidthResult:
    """Median read bandwidth of ``torch.sum`` over a `gib`-GiB float32 buffer with `threads` threads.

    The buffer is filled (so every page is resident and no first-touch fault is timed) and
    summed once before timing. float32 is used because its sum kernel is a plain vector
    load-add loop on every CPU; the bytes read per second do not depend on the dtype.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        n = int(gib * GIB) // 4
        buf = torch.ones(n, dtype=torch.float32)
        buf.sum()
        seconds = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            buf.sum()
            seconds.append(time.perf_counter() - t0)
        return _median_result("torch.sum(float32)", torch.get_num_threads(), n * 4, seconds)
    finally:
        torch.set_num_threads(previous)


def measure_gemv_bandwidth(
    gib: float = 2.0,
    repeat: int = 5,
    threads: int | None = None,
    shape: tuple[int, int] = (1408, 2048),
    dtype: torch.dtype = torch.bfloat16,
) -> BandwidthResult:
    """Weight bytes per second that ``F.linear`` streams computing one token through many matrices.

    The matrices have `shape` (default: one expert's gate or up projection of
    DeepSeek-V2-Lite, 1408 x 2048) and together occupy `gib` GiB, so every call reads
    its weight from DRAM as a decode step does; one pass calls ``F.linear`` once per
    matrix. This is the ceiling of any decode path built from PyTorch matmuls in `dtype`
    on this machine — per-call overhead included, since a decode step pays it too.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        element = torch.empty((), dtype=dtype).element_size()
        per_matrix = shape[0] * shape[1] * element
        count = max(1, int(gib * GIB) // per_matrix)
        weights = torch.empty(count, *shape, dtype=dtype)
        for i in range(0, count, 64):  # fill in slices: a float32 temporary of the whole buffer would double it
            weights[i : i + 64].copy_(torch.randn(min(64, count - i), *shape) * 0.02)
        x = torch.randn(1, shape[1], dtype=dtype)
        with torch.inference_mode():
            for i in range(count):
                F.linear(x, weights[i])
            seconds = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for i in range(count):
                    F.linear(x, weights[i])
                seconds.append(time.perf_counter() - t0)
        return _median_result(
            f"F.linear({str(dtype).removeprefix('torch.')}, 1 token, {shape[0]}x{shape[1]} matrices)",
            torch.get_num_threads(),
            count * per_matrix,
            seconds,
        )
    finally:
        torch.set_num_threads(previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="buffer size in GiB (>> last-level cache)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--gemv", action="store_true", help="also measure bf16 F.linear weight streaming")
    args = parser.parse_args()
    report: dict[str, object] = {
        "read": asdict(measure_read_bandwidth(args.gib, args.repeat, args.threads)),
        "loadavg": os.getloadavg(),
    }
    if args.gemv:
        report["gemv_bf16"] = asdict(measure_gemv_bandwidth(args.gib, max(3, args.repeat // 2), args.threads))
        report["loadavg_after"] = os.getloadavg()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
