"""The engine's quantized matrix kernels on one thread vs torch's float32 matmul on the same weights.

What it isolates: the arithmetic of a kernel (decoding blocks, integer dot products, the
per-block scales) at the token counts a decode step (1) and a prefill (4-64 per expert or
layer) give it. One thread, one weight matrix that the last-level cache holds, each call
timed best of `--repeats`: the figures are the kernel's compute rate, *not* memory speed
(`moe_layer.py` and `e2e_decode.py` measure that, over weights far larger than the cache).
The JSON reports the matrix's bytes beside the cache size so this is never mistaken for
a bandwidth figure.

The baseline in the same run is torch's `F.linear` in float32 on one thread, over the same
weights dequantized by gguf-py (what a float backend would compute); the engine's time
includes preparing the activation rows in the format its kernel takes, as in use.

    python benchmarks/gemm_kernels.py [--types Q4_K,Q6_K,Q8_0] [--tokens 1,4,8,16,64] [--rows 2048] [--cols 2048]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from kt_ops_cpuinfer import _engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import last_level_cache_bytes  # noqa: E402

# Byte offsets of the fp16 scales in each type's block (d, and dmin for Q4_K/Q5_K).
SCALE_OFFSETS = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rows: int, cols: int, ggml_type: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with small finite fp16 scales: valid blocks of `ggml_type` (timing does not depend on values)."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    n_blocks = rows * cols // block_values
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in SCALE_OFFSETS[ggml_type]:
        blocks[:, off:off + 2] = np.full(n_blocks, 1e-3, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def best_seconds(fn: Any, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _time_tokens(ggml_type: str, blocks: np.ndarray, weight: torch.Tensor, n: int, isa: str,
                 repeats: int) -> dict[str, Any]:
    """One token count: the engine's kernel on `blocks` and torch's float32 matmul on `weight`."""
    rows, cols = weight.shape
    x = torch.randn(n, cols)
    out = torch.empty(n, rows)
    engine_s = best_seconds(lambda: _engine.gemm(isa, ggml_type, blocks.ctypes.data, rows, cols, blocks.shape[1],
                                                 x.data_ptr(), n, out.data_ptr()), repeats)
    torch_s = best_seconds(lambda: F.linear(x, weight), repeats)
    flops = 2.0 * rows * cols * n
    return {
        "tokens": n,
        "engine_ms": round(engine_s * 1e3, 4),
        "engine_gflops": round(flops / engine_s / 1e9, 1),
        "engine_ns_per_token_and_256_values": round(engine_s * 1e9 / (n * rows * cols / 256), 2),
        "torch_f32_ms": round(torch_s * 1e3, 4),
        "torch_f32_gflops": round(flops / torch_s / 1e9, 1),
        "engine_speedup_over_torch_f32": round(torch_s / engine_s, 2),
    }


def measure(ggml_type: str, rows: int, cols: int, tokens: list[int], isa: str, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    blocks = random_blocks(rows, cols, ggml_type, rng)
    weight = torch.from_numpy(
        gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type]).astype(np.float32).reshape(rows, cols)
    )
    results = [_time_tokens(ggml_type, blocks, weight, n, isa, repeats) for n in tokens]
    return {"type": ggml_type, "rows": rows, "cols": cols, "weight_bytes": int(blocks.nbytes), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q8_0")
    parser.add_argument("--tokens", default="1,4,8,16,64")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--isa", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine's gemm binding runs on the calling thread alone
    isa = _engine.resolve_isa(args.isa)
    tokens = [int(t) for t in args.tokens.split(",")]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "isa": isa,
                    "last_level_cache_bytes": last_level_cache_bytes(), "threads": 1},
        "kernels": [measure(t, args.rows, args.cols, tokens, isa, args.repeats) for t in args.types.split(",")],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
