"""One DeepSeek-V2-Lite MoE layer on the CPU engine vs KExpertsTorch (bf16) vs the memory roofline.

Shape: hidden 2048, 64 routed experts of intermediate 1408, 6 active per token, plus 2
shared experts (one MLP of intermediate 2816) that kt's MoE block computes while the
routed experts run. Weight types as a Q4_K_M GGUF stores them: gate/up Q4_K and down Q8_0
(1408 is not a multiple of 256, so llama.cpp falls back to a 32-block type for down),
and an all-Q8_0 variant.

Decode reads ~38 MB (Q4_K) / ~55 MB (Q8_0) of expert weights per call, which a large L3
could hold; the benchmark therefore allocates several layers of distinct experts and
cycles through layers with fresh random routing, so calls read cold memory like a real
model's 27 layers do. How many: at least 8x the last-level cache (and 1 GiB), since an
expert touched a few calls ago can still sit in a big L3 (480 MiB on some of the machines
this runs on) -- with random routing the share of touched bytes an L3 can serve is at
most its size over the bytes allocated, which the JSON reports as `l3_share_bound`.
The roofline is measured in the same run: a streaming read of a 1 GiB buffer with
torch.sum and with the engine's own threads over the same buffer); the higher one is used. The machine is shared and its bandwidth
moves, so decode is measured in rounds, each right after its own bandwidth probe, and
the reported fraction of the roofline is the median over rounds of
(expert bytes touched / that round's read bandwidth) / that round's median call time.
The load average is recorded: on a busy machine every number here is noisy.

Two compositions with the shared experts: `engine_ms_with_shared_overlapped` runs them in
torch (bf16) while the engine computes the routed experts; `block_with_engine_shared` runs
them the way the CPU rule files do (KMLPCPUInfer on stored blocks of the variant's types,
one per cycled layer, submitted before the routed experts on the same pool) and compares
the whole block with the roofline of both weights' bytes.

Weights are random valid blocks (timing does not depend on the values); KExpertsTorch
holds random bfloat16 weights of the same shapes. Times are medians over repeats.

    python benchmarks/moe_layer.py [--threads N] [--repeats 15] [--isa auto|avx2|avx512]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig

from kt_core.moe import overlap_experts
from kt_core.weights.source import MissingTensorError, RawTensor, StateDictSource, TensorInfo
from kt_ops_cpuinfer import _engine, use_isa
from kt_ops_cpuinfer.experts import KExpertsCPU
from kt_ops_cpuinfer.mlp import KMLPCPUInfer
from kt_ops_cpuinfer.pool import get_pool, physical_cores
from kt_ops_torch.experts import KExpertsTorch

HIDDEN, EXPERTS, INTER, TOP_K, SHARED_INTER = 2048, 64, 1408, 6, 2 * 1408
KEY = "model.layers.1.mlp.experts"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GIB = 2**30
TYPE_SIZES = {"Q4_K": (256, 144), "Q8_0": (32, 34)}
SCALE_OFFSETS = {"Q4_K": (0, 2), "Q8_0": (0,)}
VARIANTS = {"Q4_K": ("Q4_K", "Q4_K", "Q8_0"), "Q8_0": ("Q8_0", "Q8_0", "Q8_0")}


class _RawSource:
    """Stacked expert blocks in memory, served raw (the way GGUFSource serves its memory map)."""

    def __init__(self, tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]) -> None:
        self._tensors = tensors
        self.description = "benchmark blocks"

    def names(self):
        return iter(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise MissingTensorError(name, self.description)
        t, shape, data = self._tensors[name]
        return TensorInfo(name, shape, t, data.nbytes)

    def load(self, name: str, **_: Any) -> torch.Tensor:
        raise TypeError("the benchmark's block source serves stored blocks only (raw), no float tensors")

    def raw(self, name: str) -> RawTensor:
        t, shape, data = self._tensors[name]
        return RawTensor(name, t, shape, data)


def _block_tensors(key: str, suffix: str, types: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
                   rng: np.random.Generator) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """`_RawSource` tensors `<key>.<projection><suffix>` of random blocks, one per projection."""
    return {f"{key}.{name}{suffix}": (t, shape, _random_blocks(shape, t, rng))
            for name, t, shape in zip(PROJECTIONS, types, shapes, strict=True)}


def _random_blocks(shape: tuple[int, ...], ggml_type: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with small finite fp16 scales: valid blocks of `ggml_type`."""
    bs, ts = TYPE_SIZES[ggml_type]
    n_blocks = math.prod(shape) // bs
    blocks = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    for off in SCALE_OFFSETS[ggml_type]:
        blocks[:, off:off + 2] = np.full(n_blocks, 1e-3, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache sysfs reports for CPU 0 (0 when it cannot be read)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


def layers_to_cycle(per_layer: int, llc: int) -> int:
    """Layers of distinct experts to allocate: >= 8x the last-level cache, >= 1 GiB, >= 2."""
    return max(2, -(-max(GIB, 8 * llc) // per_layer) + 1)


def _config() -> PretrainedConfig:
    return PretrainedConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=EXPERTS, hidden_act="silu")


def engine_layers(variant: str, count: int, threads: int, isa: str, rng: np.random.Generator) -> list[KExpertsCPU]:
    types = VARIANTS[variant]
    shapes = ((EXPERTS, INTER, HIDDEN), (EXPERTS, INTER, HIDDEN), (EXPERTS, HIDDEN, INTER))
    layers = []
    for _ in range(count):
        tensors = _block_tensors(KEY, "", types, shapes, rng)
        with use_isa(isa):
            layer = KExpertsCPU(KEY, _RawSource(tensors), _config(), None, "cpu", threads=threads)
            layer.load()
        layers.append(layer)
    return layers


def engine_shared_mlps(variant: str, count: int, threads: int, isa: str, rng: np.random.Generator) -> list[KMLPCPUInfer]:
    """The shared experts as the CPU rules run them: one KMLPCPUInfer per layer on stored blocks of `variant`."""
    types = VARIANTS[variant]
    shapes = ((SHARED_INTER, HIDDEN), (SHARED_INTER, HIDDEN), (HIDDEN, SHARED_INTER))
    key = "model.layers.1.mlp.shared_experts"
    mlps = []
    for _ in range(count):
        tensors = _block_tensors(key, ".weight", types, shapes, rng)
        with torch.device("meta"):  # only the projections' shapes are read from the module
            module = torch.nn.Module()
            for name, (rows, cols) in zip(PROJECTIONS, shapes, strict=True):
                setattr(module, name, torch.nn.Linear(cols, rows, bias=False))
        with use_isa(isa):
            mlp = KMLPCPUInfer(key, _RawSource(tensors), _config(), module, "cpu", threads=threads)
            mlp.load()
        mlps.append(mlp)
    return mlps


def torch_layers(count: int) -> list[KExpertsTorch]:
    layers = []
    for _ in range(count):
        tensors = {
            f"{KEY}.gate_proj": torch.empty(EXPERTS, INTER, HIDDEN, dtype=torch.bfloat16).normal_(0, 0.02),
            f"{KEY}.up_proj": torch.empty(EXPERTS, INTER, HIDDEN, dtype=torch.bfloat16).normal_(0, 0.02),
            f"{KEY}.down_proj": torch.empty(EXPERTS, HIDDEN, INTER, dtype=torch.bfloat16).normal_(0, 0.02),
        }
        layer = KExpertsTorch(KEY, StateDictSource(tensors), _config(), None, "cpu", dtype="bfloat16")
        layer.load()
        del tensors
        layers.append(layer)
    return layers


def expert_bytes(variant: str, inter: int = INTER) -> int:
    """Bytes of one expert's gate, up and down weights in `variant` (`inter=SHARED_INTER`: the shared MLP's)."""
    total = 0
    for t, (rows, cols) in zip(VARIANTS[variant], ((inter, HIDDEN), (inter, HIDDEN), (HIDDEN, inter)), strict=True):
        bs, ts = TYPE_SIZES[t]
        total += rows * cols // bs * ts
    return total


def _routing(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=gen), dim=-1)
    return ids, weights


def time_calls(layers: list, tokens: int, repeats: int, dtype: torch.dtype, shared: list | None = None,
               warmup: int = 2) -> list[float]:
    """Seconds per call, each call on the next layer (round robin) with fresh routing.

    With `shared` (cycled beside the layers), a call is the MoE block's own composition,
    kt_core.moe.overlap_experts: an engine shared MLP is submitted before the routed
    experts, a torch one computed while they run. Routing is drawn before the clock starts
    (the block's routing ops are not part of the time).
    """
    gen = torch.Generator().manual_seed(tokens)
    calls = []
    for i in range(warmup + repeats):
        x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
        ids, weights = _routing(tokens, gen)
        layer = layers[i % len(layers)]
        t0 = time.perf_counter()
        if shared is not None:
            overlap_experts(layer, shared[i % len(shared)], x, x, lambda: (ids, weights))  # noqa: B023 -- called at once
        else:
            layer(x, ids, weights)
        calls.append(time.perf_counter() - t0)
    return calls[warmup:]


class Bandwidth:
    """Streaming read bandwidth of a 1 GiB buffer (GB/s = 10^9 B/s): torch.sum and the engine's threads.

    The machine is shared, so its bandwidth moves from second to second; `engine` is
    therefore re-measured right before each round of decode calls and each round's decode
    time is compared with its own measurement.
    """

    def __init__(self, threads: int) -> None:
        self.buf = torch.ones(GIB // 4, dtype=torch.float32)
        self.raw = self.buf.view(torch.uint8)
        self.pool = get_pool(threads)
        self.torch_sum()
        self.engine()

    def torch_sum(self) -> float:
        t0 = time.perf_counter()
        self.buf.sum()
        return GIB / (time.perf_counter() - t0) / 1e9

    def engine(self) -> float:
        t0 = time.perf_counter()
        _engine.stream_read(self.pool, self.raw.data_ptr(), self.raw.numel())
        return GIB / (time.perf_counter() - t0) / 1e9


def decode_rounds(layers: list, bw: Bandwidth, touched: int, rounds: int, calls: int,
                  shared: list | None = None) -> dict[str, Any]:
    """Rounds of (bandwidth probe, `calls` decode calls): medians and the per-round roofline fraction.

    `touched`: the bytes a call reads (with `shared`, the shared MLP's weights too)."""
    times, rates, fractions = [], [], []
    for _ in range(rounds):
        rate = max(bw.engine(), bw.torch_sum())
        t = statistics.median(time_calls(layers, 1, calls, torch.bfloat16, shared=shared))
        rates.append(rate)
        times.append(t)
        fractions.append(touched / (rate * 1e9) / t)
    return {"expert_bytes_touched": touched, "engine_ms": round(statistics.median(times) * 1e3, 3),
            "read_gbps": round(statistics.median(rates), 2),
            "roofline_ms": round(touched / (statistics.median(rates) * 1e9) * 1e3, 3),
            "fraction_of_roofline": round(statistics.median(fractions), 3),
            "fraction_per_round": [round(f, 3) for f in fractions],
            "effective_gbps": round(touched / statistics.median(times) / 1e9, 2)}


def shared_mlp() -> torch.nn.Module:
    """DeepSeek-V2-Lite's 2 shared experts: one SwiGLU MLP of intermediate 2816, in bfloat16."""

    class SharedMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(HIDDEN, SHARED_INTER, bias=False, dtype=torch.bfloat16)
            self.up = torch.nn.Linear(HIDDEN, SHARED_INTER, bias=False, dtype=torch.bfloat16)
            self.down = torch.nn.Linear(SHARED_INTER, HIDDEN, bias=False, dtype=torch.bfloat16)

        @torch.no_grad()
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    return SharedMLP()


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: physical cores)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--isa", default="auto", choices=["auto", "avx2", "avx512"])
    parser.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--skip-torch", action="store_true", help="do not time KExpertsTorch (saves ~2.5 GB)")
    args = parser.parse_args()
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    llc = last_level_cache_bytes()

    report: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_available": len(os.sched_getaffinity(0)),
                    "engine_threads": threads, "torch_threads": torch.get_num_threads(),
                    "isas_supported": _engine.supported_isas(), "last_level_cache_bytes": llc,
                    "load_average_at_start": os.getloadavg()},
        "shape": {"hidden": HIDDEN, "experts": EXPERTS, "intermediate": INTER, "top_k": TOP_K,
                  "shared_intermediate": SHARED_INTER},
        "results": [],
    }
    bw = Bandwidth(threads)
    report["bandwidth_1gib_read_gbps"] = {
        "torch_sum": round(statistics.median(bw.torch_sum() for _ in range(5)), 2),
        "engine_stream_read": round(statistics.median(bw.engine() for _ in range(5)), 2),
    }
    shared = shared_mlp()

    torch_set = None if args.skip_torch else torch_layers(2)
    for variant in VARIANTS:
        per_layer = expert_bytes(variant) * EXPERTS
        count = layers_to_cycle(per_layer, llc)
        layers = engine_layers(variant, count, threads, args.isa, rng)
        isa = layers[0].isa
        touched = expert_bytes(variant) * TOP_K
        entry: dict[str, Any] = {
            "weights": dict(zip(("gate", "up", "down"), VARIANTS[variant], strict=True)), "isa": isa,
            "layers_cycled": count, "expert_bytes_allocated": per_layer * count,
            "l3_share_bound": round(llc / (per_layer * count), 3),
            "decode": decode_rounds(layers, bw, touched, rounds=args.repeats, calls=20),
            "prefill": [],
        }
        entry["decode"]["engine_ms_with_shared_overlapped"] = ms(
            time_calls(layers, 1, args.repeats * 4, torch.bfloat16, shared=[shared]))
        entry["decode"]["shared_experts_alone_ms"] = ms(_time_shared(shared, 1, args.repeats * 4))
        mlps = engine_shared_mlps(variant, count, threads, args.isa, rng)
        entry["decode"]["block_with_engine_shared"] = decode_rounds(
            layers, bw, touched + expert_bytes(variant, SHARED_INTER), rounds=args.repeats, calls=20, shared=mlps)
        del mlps
        if torch_set is not None:
            entry["decode"]["torch_bf16_ms"] = ms(time_calls(torch_set, 1, args.repeats * 2, torch.bfloat16))
        for tokens in args.prefill:
            reps = max(3, args.repeats // (tokens // 64 or 1))
            t = time_calls(layers, tokens, reps, torch.bfloat16, warmup=1)
            flops = 2 * 3 * HIDDEN * INTER * tokens * TOP_K
            item = {"tokens": tokens, "engine_ms": ms(t), "engine_tokens_per_s": round(tokens / statistics.median(t), 1),
                    "engine_gflops": round(flops / statistics.median(t) / 1e9, 1)}
            if torch_set is not None:
                tt = time_calls(torch_set, tokens, max(3, reps // 2), torch.bfloat16, warmup=1)
                item["torch_bf16_ms"] = ms(tt)
                item["torch_bf16_tokens_per_s"] = round(tokens / statistics.median(tt), 1)
            entry["prefill"].append(item)
        report["results"].append(entry)
        del layers
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def _time_shared(shared: torch.nn.Module, tokens: int, repeats: int) -> list[float]:
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16)
    out = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        shared(x)
        out.append(time.perf_counter() - t0)
    return out[2:]


if __name__ == "__main__":
    main()
