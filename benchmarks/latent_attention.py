"""MLA's absorbed attention core on the CPU engine vs torch's float32 matmuls on the same cache.

Shape: DeepSeek-V2-Lite's (16 heads, kv_lora_rank 512, rotary 64), bfloat16 cache, 27
layers' caches of `--keys` rows each. The core is scores = q_latent·c_kv + q_pe·k_pe, a
softmax over each query's visible keys, then Σ p·c_kv: what one decode step (`--queries
1`) or a chunk of a prefill (`--queries N`, causal) spends on attention besides the
projections. The baseline is what kt's torch path computes: the cache widened to float32,
two matmuls for the scores, softmax, one matmul for the context (torch at its own thread
setting, the same thread count as the engine's pool).

Cache: 27 layers of 2048 keys are 64 MB, which a large L3 holds. "warm" times the 27
layers back to back; "cold" reads 400 MB through the engine's threads before each layer,
as a decode step's expert weights would, and sums the layers' times. Best of `--repeats`
rounds (the machine is shared; the best round is the least disturbed one).

    python benchmarks/latent_attention.py [--keys 2048] [--queries 1] [--repeats 5] [--threads N]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from kt_ops_cpuinfer import _engine
from kt_ops_cpuinfer.isa import current_isa
from kt_ops_cpuinfer.pool import get_pool

HEADS, LATENT, ROPE, LAYERS = 16, 512, 64, 27
FLUSH_BYTES = 400 << 20


def best_ms(run: Callable[[int], None], flush: Callable[[], None] | None, repeats: int) -> float:
    """Best round's time for all layers, in milliseconds (flushed before each layer when `flush`)."""
    best = float("inf")
    for _ in range(repeats):
        total = 0.0
        for layer in range(LAYERS):
            if flush is not None:
                flush()
            start = time.perf_counter()
            run(layer)
            total += time.perf_counter() - start
        best = min(best, total * 1e3)
    return round(best, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    keys, queries = args.keys, args.queries
    if not 1 <= queries <= keys:
        parser.error(f"--queries must be between 1 and --keys ({keys}), got {queries}")

    pool = get_pool(args.threads)
    torch.set_num_threads(pool.threads)
    attention = _engine.LatentAttention(pool, current_isa())
    gen = torch.Generator().manual_seed(0)
    c_kv = [torch.randn(keys, LATENT, generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
    k_pe = [torch.randn(keys, ROPE, generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
    q_latent = torch.randn(queries, HEADS, LATENT, generator=gen)
    q_pe = torch.randn(queries, HEADS, ROPE, generator=gen)
    visible = torch.arange(keys - queries + 1, keys + 1, dtype=torch.int32)  # causal: the last `queries` tokens
    mask = torch.arange(keys)[None, None, :] < visible[:, None, None]
    scale = (LATENT + ROPE) ** -0.5
    out = torch.empty(queries, HEADS, LATENT)
    flush_buffer = torch.empty(FLUSH_BYTES, dtype=torch.uint8)

    def engine(layer: int) -> None:
        attention.forward(
            q_latent.data_ptr(), q_pe.data_ptr(), queries, HEADS, LATENT, ROPE,
            (c_kv[layer].data_ptr(), "BF16", LATENT * 2), (k_pe[layer].data_ptr(), "BF16", ROPE * 2),
            keys, visible.data_ptr(), scale, out.data_ptr(),
        )

    def torch_core(layer: int) -> torch.Tensor:
        latent = c_kv[layer].float()
        scores = (q_latent @ latent.T + q_pe @ k_pe[layer].float().T) * scale
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ latent

    def flush() -> None:
        _engine.stream_read(pool, flush_buffer.data_ptr(), FLUSH_BYTES)

    engine(0)
    max_error = (out - torch_core(0)).abs().max().item()
    flops = 2 * queries * HEADS * keys * (2 * LATENT + ROPE) * LAYERS  # scores and context, causal mask ignored
    result = {
        "isa": current_isa(),
        "threads": pool.threads,
        "keys": keys,
        "queries": queries,
        "layers": LAYERS,
        "max_abs_error_vs_torch": max_error,
        "engine_ms_warm": best_ms(engine, None, args.repeats),
        "engine_ms_cold": best_ms(engine, flush, args.repeats),
        "torch_ms_warm": best_ms(torch_core, None, args.repeats),
        "torch_ms_cold": best_ms(torch_core, flush, args.repeats),
    }
    result["engine_gflops_warm"] = round(flops / result["engine_ms_warm"] / 1e6, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
