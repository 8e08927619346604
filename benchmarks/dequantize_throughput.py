"""Throughput of `kt_core.quant.dequantize` against gguf-py's numpy reference, per GGML type.

Prints one JSON object. For each type it reports elements/s, GB/s of quantized input
read and GB/s of float32 output written, for kt (on a tensor whose input plus output is
larger than a 480 MiB last-level cache, so memory traffic is really measured) and for
gguf-py (on the first `--reference-elements` of the same data, because it is slow),
plus the speedup. Both run in the same process on the same cores; timings are the best
of `--repeat` runs, each including allocation of the output, as a caller would see.

Beside them stands the write ceiling measured in the same run: filling a fresh float32
tensor of the same size (allocated the way `dequantize` allocates its output). No
dequantizer can beat it, so `ceiling_speedup` is the most any decoder could gain over
gguf-py on this machine, and `share_of_ceiling` says how close kt's decoder comes.

Example:
    PYTHONPATH=kt_core/src python benchmarks/dequantize_throughput.py --types Q4_K,Q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kt_core.quant import host_memory
from kt_core.quant.dequantize import SUPPORTED_TYPES, dequantize

ROW = 4096
"""Row length of the benchmark tensors: a multiple of every block size, typical of LLMs."""

SCALE_FIELDS: dict[str, tuple[tuple[int, str], ...]] = {
    "Q4_0": ((0, "f16"),),
    "Q4_1": ((0, "f16"), (2, "f16")),
    "Q5_0": ((0, "f16"),),
    "Q5_1": ((0, "f16"), (2, "f16")),
    "Q8_0": ((0, "f16"),),
    "Q2_K": ((80, "f16"), (82, "f16")),
    "Q3_K": ((108, "f16"),),
    "Q4_K": ((0, "f16"), (2, "f16")),
    "Q5_K": ((0, "f16"), (2, "f16")),
    "Q6_K": ((208, "f16"),),
    "Q8_K": ((0, "f32"),),
    "IQ4_NL": ((0, "f16"),),
    "IQ4_XS": ((0, "f16"),),
}
"""Byte offsets of each block's float scale fields, overwritten with sane values so the
data looks like real weights (random bytes would give NaN/inf scales)."""


def make_data(name: str, n_elements: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for `n_elements` of type `name`, with finite float fields."""
    qtype = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = n_elements // block_size
    if name in ("F32", "F16", "BF16"):
        values = rng.standard_normal(n_elements, dtype=np.float32)
        if name == "F32":
            return values.view(np.uint8)
        if name == "F16":
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset, kind in SCALE_FIELDS[name]:
        float_type = np.float16 if kind == "f16" else np.float32
        width = np.dtype(float_type).itemsize
        scales = rng.uniform(-0.05, 0.05, size=n_blocks).astype(float_type)
        blocks[:, offset : offset + width] = scales.view(np.uint8).reshape(n_blocks, width)
    return blocks.reshape(-1)


def reference_dequantize(name: str, data: np.ndarray) -> np.ndarray:
    """gguf-py's numpy dequantization of the flat bytes in `data`."""
    qtype = GGMLQuantizationType[name]
    if name == "F32":
        return data.view(np.float32).copy()
    if name == "F16":
        return gguf.quants.dequantize(data.view(np.float16), qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return gguf.quants.dequantize(data.reshape(-1, ROW // block_size * type_size), qtype)


def best_time(run: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` runs; each result is freed before the next run."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        del result
        best = min(best, elapsed)
    return best


def rates(n_elements: int, input_bytes: int | None, seconds: float) -> dict[str, float]:
    """Timing of `n_elements` float32 outputs; input GB/s only where there is an input."""
    result = {"seconds": round(seconds, 6), "elements_per_s": round(n_elements / seconds)}
    if input_bytes is not None:
        result["input_gb_per_s"] = round(input_bytes / seconds / 1e9, 3)
    result["output_gb_per_s"] = round(n_elements * 4 / seconds / 1e9, 3)
    return result


def write_ceiling(n_elements: int, repeat: int) -> dict[str, float]:
    """Best rate of allocating and filling a float32 output of `n_elements`: the bound
    every decoder's output stream runs into once its arithmetic is free."""

    def fill() -> torch.Tensor:
        return host_memory.empty(n_elements, torch.float32, torch.device("cpu")).fill_(1.0)

    return rates(n_elements, None, best_time(fill, repeat))


def benchmark_type(
    name: str, n_elements: int, reference_elements: int, repeat: int, ceiling: dict[str, float]
) -> dict[str, object]:
    qtype = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = make_data(name, n_elements, np.random.default_rng(0))
    ours = best_time(lambda: dequantize(data, name, (n_elements // ROW, ROW)), repeat)
    ref_bytes = reference_elements // block_size * type_size
    ref_data = data[:ref_bytes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in random data's products
        reference = best_time(lambda: reference_dequantize(name, ref_data), max(1, min(repeat, 2)))
    ours_rates = rates(n_elements, data.nbytes, ours)
    reference_rates = rates(reference_elements, ref_bytes, reference)
    return {
        "elements": n_elements,
        "input_bytes": data.nbytes,
        "output_bytes": n_elements * 4,
        "kt": ours_rates,
        "reference_elements": reference_elements,
        "gguf_py": reference_rates,
        "speedup": round(ours_rates["elements_per_s"] / reference_rates["elements_per_s"], 2),
        "ceiling_speedup": round(ceiling["elements_per_s"] / reference_rates["elements_per_s"], 2),
        "share_of_ceiling": round(ours_rates["elements_per_s"] / ceiling["elements_per_s"], 3),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--types",
        default=",".join(sorted(SUPPORTED_TYPES - {"Q8_K"})),
        help="comma-separated GGML type names (default: all supported that gguf-py can decode)",
    )
    parser.add_argument(
        "--elements",
        type=int,
        default=1 << 27,
        help="elements per tensor for kt (default 2**27: 512 MiB of float32 output, so "
        "input plus output exceed a 480 MiB L3 and memory, not cache, is measured)",
    )
    parser.add_argument(
        "--reference-elements",
        type=int,
        default=1 << 24,
        help="elements gguf-py decodes (the first ones of the same data; default 2**24)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the best counts")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, usually all cores)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    unknown = [n for n in names if n not in SUPPORTED_TYPES]
    if unknown:
        print(f"unsupported types: {', '.join(unknown)}", file=sys.stderr)
        return 2
    elements = args.elements // ROW * ROW
    reference_elements = min(args.reference_elements, elements) // ROW * ROW
    if elements <= 0 or reference_elements <= 0:
        print(f"--elements and --reference-elements must be at least {ROW}", file=sys.stderr)
        return 2
    report: dict[str, object] = {
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "gguf_py_version": getattr(gguf, "__version__", None) or _gguf_version(),
        "shape": [elements // ROW, ROW],
        "elements": elements,
        "reference_elements": reference_elements,
        "repeat": args.repeat,
        "timing": "best of repeat, wall clock, including output allocation",
        "load_average_before": _load_average(),
        "results": {},
    }
    ceiling = write_ceiling(elements, args.repeat)
    report["write_ceiling"] = ceiling
    results: dict[str, object] = report["results"]  # type: ignore[assignment]
    for name in names:
        results[name] = benchmark_type(name, elements, reference_elements, args.repeat, ceiling)
    # Other processes on the machine distort timings (torch's threads wait on each other);
    # the load average lets a reader judge whether a run was quiet.
    report["load_average_after"] = _load_average()
    print(json.dumps(report, indent=2))
    return 0


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _gguf_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
