"""int4 × 16-bit matmul (kt-ops-marlin) against a bf16 ``torch.matmul``, at decode-sized batches.

Decode is bound by the bytes of weights read per token; int4 weights (4 bits + one
16-bit scale per group) are ~3.9× fewer bytes than bf16, so a kernel that streams them
at the same bandwidth is ~3.9× faster. For each weight shape ``[N, K]`` (out × in) and
batch M this prints the time per call and the achieved GB/s (bytes of weights, scales,
activations and output per call ÷ time) of

* ``int4``: the Triton kernel on CUDA (when triton is installed), else the CPU path
  (torch's CPU int4 matmul on the same int4 weights), activations in ``--dtype``;
* ``bf16``: ``torch.matmul(x, Wᵀ)`` with a bf16 weight on the same device,

next to the device's read bandwidth measured in the same run (a ``torch.sum`` over a
buffer far larger than any cache) and, for known GPUs, the datasheet peak. Each int4
configuration is also checked once against ``x @ (q·s)ᵀ`` (``max_rel_err``). Timings are
the median of repeated calls after warm-up (CUDA: synchronized, per-call events); the
calls cycle through copies of the weight adding up to ``--rotate-mib`` (default 256 MiB,
more than a 32 MiB CPU L3 or a 50 MiB H100 L2), so each call reads its weight from
memory, as a decode step does, not from a cache the previous call filled.

    python benchmarks/int4_matmul.py                 # the CUDA device if any, else the CPU
    python benchmarks/int4_matmul.py --device cpu --batches 1,16

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace

import torch

from kt_ops_marlin.device_paths import Int4Matmul, prepare_int4
from kt_ops_marlin.int4 import quantize_int4
from kt_ops_marlin.triton_kernel import triton_available

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
"""``[N, K]``: a square projection, a down projection (K = 14336) and a gate/up projection (N = 14336)."""

PEAK_GBPS = {
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H200": 4800.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0,
    "RTX 4090": 1008.0,
}
"""Datasheet memory bandwidth (GB/s) by a substring of ``torch.cuda.get_device_name``."""


def peak_bandwidth(device: torch.device) -> float | None:
    """The datasheet bandwidth of a known GPU, else None (CPUs: see the measured value)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in PEAK_GBPS.items() if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, min_time: float, warmup: int = 3) -> float:
    """Median seconds per call of `fn` over at least `min_time` seconds (and at least 5 calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 5 or time.perf_counter() - start < min_time:
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_read_bandwidth(device: torch.device, gib: float) -> float:
    """GB/s of ``torch.sum`` over a `gib` GiB buffer (median of ≥ 5 calls): what streaming reads reach here."""
    buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    seconds = time_call(buffer.sum, device, min_time=0.0, warmup=1)
    del buffer
    return gib * 2**30 / seconds / 1e9


def _copies_of(int4: Int4Matmul, count: int) -> list[Int4Matmul]:
    """`int4` and `count - 1` copies with their own tensors (same values)."""
    clones = [
        replace(int4, **{f.name: getattr(int4, f.name).clone() for f in fields(int4)
                         if isinstance(getattr(int4, f.name), torch.Tensor)})
        for _ in range(count - 1)
    ]
    return [int4, *clones]


class Rotation:
    """Calls cycling through several copies of a weight, so none is served from cache."""

    def __init__(self, copies: list, call: Callable) -> None:
        self.copies, self.call, self.i = copies, call, 0

    def __call__(self) -> object:
        self.i = (self.i + 1) % len(self.copies)
        return self.call(self.copies[self.i])


def bench_shape(
    n: int, k: int, batches: list[int], device: torch.device, dtype: torch.dtype, group_size: int, min_time: float,
    rotate_bytes: int,
) -> list[dict]:
    """Both implementations for one weight shape at every batch size."""
    gen = torch.Generator(device="cpu").manual_seed(n * 7 + k)
    weight = (torch.randn(n, k, generator=gen) * 0.02).to(device)
    int4: Int4Matmul = prepare_int4(weight, group_size, dtype, device)
    reference = quantize_int4(weight, group_size, dtype).dequantize(torch.float32)
    bf16 = weight.to(torch.bfloat16)
    del weight
    int4_copies = _copies_of(int4, max(1, -(-rotate_bytes // int4.nbytes)))
    bf16_copies = [bf16] + [bf16.clone() for _ in range(max(1, -(-rotate_bytes // (bf16.numel() * 2))) - 1)]
    rows = []
    for m in batches:
        x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        xb = x.to(torch.bfloat16)
        out = int4(x).float()
        expected = x.float() @ reference.t()
        rel_err = float((out - expected).abs().max() / expected.abs().max())
        act_bytes = m * k * x.element_size() + m * n * x.element_size()
        t_int4 = time_call(Rotation(int4_copies, lambda w, x=x: w(x)), device, min_time)
        t_bf16 = time_call(Rotation(bf16_copies, lambda w, xb=xb: torch.matmul(xb, w.t())), device, min_time)
        int4_bytes = int4.nbytes + act_bytes
        bf16_bytes = bf16.numel() * 2 + m * k * 2 + m * n * 2
        rows.append({
            "n": n, "k": k, "m": m,
            "int4_us": round(t_int4 * 1e6, 1), "int4_GBps": round(int4_bytes / t_int4 / 1e9, 1),
            "bf16_us": round(t_bf16 * 1e6, 1), "bf16_GBps": round(bf16_bytes / t_bf16 / 1e9, 1),
            "speedup_vs_bf16": round(t_bf16 / t_int4, 2),
            "int4_weight_bytes": int4.nbytes, "bf16_weight_bytes": bf16.numel() * 2,
            "max_rel_err": float(f"{rel_err:.3g}"),
            "weight_copies": {"int4": len(int4_copies), "bf16": len(bf16_copies)},
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="activation dtype of int4")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK weight shapes")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per measurement")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer size of the read-bandwidth measure")
    parser.add_argument("--rotate-mib", type=float, default=256.0, help="total size of the weight copies cycled through")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default when omitted)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and not triton_available():
        print("int4 on cuda needs triton: pip install --no-deps triton==3.9.0", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = [row for n, k in shapes for row in bench_shape(
        n, k, batches, device, dtype, args.group_size, args.min_time, int(args.rotate_mib * 2**20))]
    report = {
        "benchmark": "int4_matmul",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "int4_path": "triton" if device.type == "cuda" else "cpu (torch _weight_int4pack_mm_for_cpu)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "activation_dtype": args.dtype,
        "group_size": args.group_size,
        "peak_GBps": peak_bandwidth(device),
        "measured_read_GBps": round(measure_read_bandwidth(device, args.bandwidth_gib), 1),
        "results": rows,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
