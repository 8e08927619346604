"""End-to-end prefill/decode speed of kt's PyTorch path, transformers eager, and the memory roofline.

For one GGUF file (made by ``benchmarks/synthetic_model.py``) this prints one JSON object
comparing, on the same weights and the same token counts:

- **kt** — ``kt bench --rules R --json`` run as a subprocess for each rule file of
  ``--rules``: by default ``deepseek-v2-lite-cpu`` (routed experts on the native CPU
  engine, on the GGUF blocks) and ``deepseek-v2-lite-cpu-torch`` (experts by
  ``KExpertsTorch`` on dequantized bf16); both with absorbed MLA and ``KLinearTorch``, so
  what is measured is exactly what a user runs;
- **llama.cpp** (with ``--llama-bench BINARY``) — its ``llama-bench`` on the same file, an
  outside peer built separately (kt neither ships nor depends on it);
- **transformers eager** — ``AutoModelForCausalLM.from_config`` filled with the same
  weights dequantized to bf16 (through kt's GGUF source, the only reader that knows the
  DeepSeek GGUF names), prefill then greedy decode with a ``StaticCache``, once per
  ``experts_implementation`` transformers offers on CPU (``eager``, ``batched_mm``,
  ``grouped_mm``), each in its own process so peak RSS is per measurement;
- **the memory-bandwidth roofline** — read bandwidth measured in the same run
  (``benchmarks/bandwidth.py``) divided by the bytes of weight a decode step must read:
  per layer attention + router + shared experts + top-k of the routed experts (+ the
  dense MLP of the first layers), plus ``lm_head`` and one embedding row, counted both
  as kt's torch path holds them (bf16; routers float32) and as stored in the GGUF
  (quantized bytes, from the file's tensor table).

Every configuration runs ``--repeat`` times in a fresh process (load, one warm-up
prefill of 8 tokens, then the timed prefill and ``--gen-len`` decode steps — kt bench's
protocol) and medians are reported; the machines are shared, so the 1-minute load
average is recorded around every process and the bandwidth is measured before and after.

    .venv/bin/python benchmarks/e2e_decode.py bench-out/dsv2lite-synth-Q4_K.gguf \\
        --prompt-len 128 --gen-len 32 --repeat 3 --out bench-out/e2e-Q4_K.json

Nothing here asserts on time: it measures and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import measure_gemv_bandwidth, measure_read_bandwidth  # noqa: E402

from kt_core.runtime.sampling import greedy_token  # noqa: E402

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "grouped_mm/batched_mm")
"""The transformers 5 experts implementations measured, as PREFILL[/DECODE].

transformers offers ``eager`` (a loop over the experts hit), ``grouped_mm`` (its default;
one ``torch.nn.functional.grouped_mm`` over tokens sorted by expert) and ``batched_mm``
(gathers a copy of each (token, expert) pair's weights, then one ``bmm``); ``deepgemm``
and ``sonicmoe`` are CUDA-only. ``batched_mm`` alone cannot run a 128-token prefill here:
its gather would copy 128 x 6 experts' weights, about 13 GB per layer. transformers'
``generate`` itself switches ``grouped_mm`` to ``batched_mm`` for decoding on GPUs (not
on CPUs); ``grouped_mm/batched_mm`` measures that switch on the CPU."""

WARMUP_TOKENS = 8
"""Tokens of the untimed first prefill, as in ``kt bench``: first calls pay one-time allocations."""


# -- machine -----------------------------------------------------------------------------


def machine_facts(threads: int) -> dict[str, Any]:
    """What a reader needs to compare these numbers with another machine's."""
    cpu_model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model == "unknown":
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import transformers

    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "isa": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}),
        "mem_total_gib": mem_total,
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kernel": platform.release(),
    }


# -- bytes touched per decoded token ----------------------------------------------------


def _part_of(name: str) -> str:
    """Which part of the model a transformers parameter name belongs to (for the byte budget)."""
    if name == "model.embed_tokens.weight":
        return "embedding_row"
    if name == "lm_head.weight":
        return "lm_head"
    if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.e_score_correction_bias"):
        return "router"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.experts." in name:
        return "routed_experts_active"
    if ".mlp." in name:
        return "dense_mlp"
    return "other"


def bytes_per_token(gguf: Path, held_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Bytes of weights one decode step reads, by part: as kt's torch path holds them and as stored.

    The fraction of each tensor a single token touches: all of it, except the routed
    experts (``top_k / n_routed_experts`` of the stacked tensors: one token picks
    exactly top_k distinct experts per layer) and the embedding (one row of
    ``vocab_size``). "held" counts ``held_dtype`` bytes per element, float32 for the
    routers (kt's MoE blocks and transformers both keep them in float32); "stored"
    counts the GGUF tensors' bytes (quantized blocks, scales included), read from the
    file's tensor table through kt's name map. The KV cache read by attention is left
    out: at these lengths it is under 0.1 % of the weights.
    """
    from transformers import AutoModelForCausalLM

    from kt_core.plugins import get_registry
    from kt_core.runtime.model_source import open_model

    inputs = open_model(None, str(gguf), get_registry())
    config = inputs.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    top_k, n_experts = int(config.num_experts_per_tok), int(config.n_routed_experts)
    held_elem = torch.empty((), dtype=held_dtype).element_size()
    held: dict[str, float] = {}
    stored: dict[str, float] = {}
    stored_types: dict[str, set[str]] = {}
    for name, tensor in model.state_dict().items():
        part = _part_of(name)
        fraction = 1.0
        if part == "routed_experts_active":
            fraction = top_k / n_experts
        elif part == "embedding_row":
            fraction = 1.0 / int(tensor.shape[0])
        elem = 4 if part == "router" else held_elem
        held[part] = held.get(part, 0.0) + tensor.numel() * elem * fraction
        info = inputs.source.info(name)
        stored[part] = stored.get(part, 0.0) + info.nbytes * fraction
        stored_types.setdefault(part, set()).update(info.storage.split("+"))
    return {
        "held": {
            "description": f"weights as kt's torch backend holds them ({str(held_dtype).removeprefix('torch.')}, routers float32)",
            "total_bytes": int(sum(held.values())),
            "by_part": {k: int(v) for k, v in held.items()},
        },
        "stored": {
            "description": "weights as stored in the GGUF (quantized bytes incl. block scales)",
            "total_bytes": int(sum(stored.values())),
            "by_part": {k: int(v) for k, v in stored.items()},
            "ggml_types_by_part": {k: sorted(v) for k, v in stored_types.items()},
        },
        "model": {
            "layers": int(config.num_hidden_layers), "first_k_dense_replace": int(config.first_k_dense_replace),
            "experts_per_token": top_k, "routed_experts": n_experts, "vocab_size": int(config.vocab_size),
        },
    }


# -- kt bench ----------------------------------------------------------------------------


def kt_executable() -> list[str]:
    """The ``kt`` of the running interpreter's environment (not whatever is first on PATH)."""
    beside = Path(sys.executable).with_name("kt")
    return [str(beside)] if beside.exists() else ["kt"]


def run_json_process(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run `cmd`, parse the last stdout line as JSON, and record the load average around it."""
    before = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    result = json.loads(lines[-1])
    result["process_wall_seconds"] = round(wall, 2)
    # CPU seconds the process got per wall second: well below its thread count means the
    # machine's other users took the cores (spin-waiting OpenMP threads still count as busy).
    result["process_cpu_per_wall"] = round(cpu / wall, 2)
    result["loadavg_before"] = [round(x, 2) for x in before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def kt_bench_cmd(gguf: Path, rules: str, args: argparse.Namespace) -> list[str]:
    cmd = [*kt_executable(), "bench", "--gguf", str(gguf), "--rules", rules, "--prompt-len", str(args.prompt_len),
           "--gen-len", str(args.gen_len), "--dtype", args.dtype, "--json"]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


def llama_bench(binary: Path, gguf: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """llama.cpp's own ``llama-bench`` on the same file and token counts: the outside peer.

    llama-bench times a prefill of ``-p`` tokens and, separately, ``-n`` decoded tokens
    from an empty context (``-r`` repetitions, its own warm-up); peak RSS comes from the
    kernel's accounting of the child process.
    """
    cmd = [str(binary), "-m", str(gguf), "-p", str(args.prompt_len), "-n", str(args.gen_len), "-t", str(threads),
           "-r", "3", "-o", "json"]
    before = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    rows = json.loads(proc.stdout)
    result: dict[str, Any] = {"command": " ".join(cmd), "loadavg_before": [round(x, 2) for x in before],
                              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    for row in rows:
        kind = "prefill_tokens_per_s" if row.get("n_prompt", 0) > 0 else "decode_tokens_per_s"
        result[kind] = float(row["avg_ts"])
        result[kind.replace("_per_s", "_per_s_stdev")] = float(row.get("stddev_ts", 0.0))
        result.setdefault("build", f"{row.get('build_commit', '?')} ({row.get('cpu_info', '')}, {row.get('backends', '')})")
    return result


# -- transformers worker -------------------------------------------------------------------


def hf_worker(gguf: Path, experts_spec: str, prompt_len: int, gen_len: int, dtype: torch.dtype,
              threads: int | None) -> dict[str, Any]:
    """One transformers measurement: build, fill with the GGUF's weights, prefill, greedy decode.

    The model is built on ``meta`` (no random initialisation to pay for) and every tensor
    is then assigned from kt's GGUF source dequantized to `dtype` (routers float32, as
    transformers' ``_keep_in_fp32_modules_strict`` asks). Buffers computed at
    construction (the rotary embedding's ``inv_freq``) are recomputed by rebuilding that
    module on the CPU. The timed part mirrors ``kt bench``: a fresh ``StaticCache`` of
    ``prompt_len + gen_len + 1`` slots, one forward over the prompt (``logits_to_keep=1``),
    then `gen_len` one-token forwards, each taking the argmax of the last logits.
    `experts_spec` is ``IMPL`` or ``PREFILL_IMPL/DECODE_IMPL`` (switched with
    ``set_experts_implementation`` between prefill and decode, as transformers'
    ``generate`` does on GPUs); the warm-up runs both.
    """
    from transformers import AutoModelForCausalLM, StaticCache

    from kt_core.plugins import get_registry
    from kt_core.runtime.model_source import open_model

    if threads is not None:
        torch.set_num_threads(threads)
    prefill_impl, _, decode_impl = experts_spec.partition("/")
    decode_impl = decode_impl or prefill_impl
    t_start = time.perf_counter()
    inputs = open_model(None, str(gguf), get_registry())
    config = inputs.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=prefill_impl)
    t_built = time.perf_counter()
    fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    state = {}
    for name, tensor in model.state_dict().items():
        target = torch.float32 if any(name.endswith(p) for p in fp32) else tensor.dtype
        state[name] = inputs.source.load(name, dtype=target)
    t_read = time.perf_counter()
    model.load_state_dict(state, strict=True, assign=True)
    del state
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)):
                setattr(parent, child_name, type(child)(config=config))  # rotary embeddings: inv_freq from config
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"still on meta after loading: {left[:8]}")
    model.eval()
    load_seconds = time.perf_counter() - t_start
    timer = PartTimer(model, int(getattr(config, "first_k_dense_replace", 0)))

    vocab = int(config.vocab_size)
    prompt = [(i * 7919 + 13) % vocab for i in range(prompt_len)]  # kt bench's prompt

    def forward(cache: StaticCache, ids: list[int], start: int) -> torch.Tensor:
        input_ids = torch.tensor([ids])
        positions = torch.arange(start, start + len(ids))[None]
        out = model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    with torch.inference_mode():
        warm = StaticCache(config=config, max_cache_len=prompt_len + gen_len + 1)
        forward(warm, prompt[:WARMUP_TOKENS], 0)
        model.set_experts_implementation(decode_impl)
        forward(warm, prompt[WARMUP_TOKENS : WARMUP_TOKENS + 1], WARMUP_TOKENS)
        model.set_experts_implementation(prefill_impl)
        cache = StaticCache(config=config, max_cache_len=prompt_len + gen_len + 1)
        t0, c0 = time.perf_counter(), time.process_time()
        timer.phase = "prefill"
        logits = forward(cache, prompt, 0)
        prefill_s = time.perf_counter() - t0
        timer.phase = "decode"
        token = greedy_token(logits)
        model.set_experts_implementation(decode_impl)
        decode_impl_used = model.config._experts_implementation
        tokens = [token]
        t1 = time.perf_counter()
        for step in range(gen_len):
            token = greedy_token(forward(cache, [token], prompt_len + step))
            tokens.append(token)
        decode_s = time.perf_counter() - t1
        timer.phase = None
        run_cpu_per_wall = (time.process_time() - c0) / (time.perf_counter() - t0)
    return {
        "experts_implementation": {"prefill": prefill_impl, "decode": decode_impl_used},
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "load_seconds": round(load_seconds, 3),
        "load_breakdown_seconds": {
            "open_and_build_meta": round(t_built - t_start, 3),
            "read_and_dequantize": round(t_read - t_built, 3),
            "assign": round(load_seconds - (t_read - t_start), 3),
        },
        "prefill_tokens_per_s": prompt_len / prefill_s,
        "decode_tokens_per_s": gen_len / decode_s,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "run_cpu_per_wall": round(run_cpu_per_wall, 2),
        "prefill_ms": timer.milliseconds("prefill", prefill_s),
        "decode_ms_per_token": timer.milliseconds("decode", decode_s, gen_len),
        "greedy_tokens_head": tokens[:8],
    }


# -- where the time goes ----------------------------------------------------------------------


def _step_part(name: str, first_dense: int) -> str | None:
    """The part of a forward step a module's time is booked to (None: not timed)."""
    if name == "lm_head":
        return "lm_head"
    pieces = name.split(".")
    if len(pieces) == 4 and pieces[:2] == ["model", "layers"]:
        if pieces[3] == "self_attn":
            return "attention"
        if pieces[3] == "mlp":
            return "dense_mlp" if int(pieces[2]) < first_dense else "moe_block"
    if len(pieces) == 5 and pieces[3] == "mlp" and pieces[4] == "shared_experts":
        return "shared_experts"
    return None


class PartTimer:
    """Wall time per part of the model (attention, dense MLP, MoE, shared experts, lm_head) per phase.

    Forward hooks on the modules `_step_part` names; the CPU computes synchronously, so
    the wall time between a module's pre- and post-hook is its cost. kt's MoE block calls
    its routed experts through ``submit``/``sync`` (no ``forward``), so the routed experts
    are booked as the MoE block's time minus the shared experts'; the same rule is applied
    to transformers. The hooks cost a few microseconds per module call, under 0.1 % of a
    step here.
    """

    def __init__(self, model: torch.nn.Module, first_dense: int) -> None:
        self.spent: dict[str, dict[str, float]] = {}
        self.phase: str | None = None
        self._started: dict[int, float] = {}
        for name, module in model.named_modules():
            part = _step_part(name, first_dense)
            if part is not None:
                module.register_forward_pre_hook(self._pre)
                module.register_forward_hook(self._post_for(part))

    def _pre(self, module: torch.nn.Module, _args: Any) -> None:
        if self.phase is not None:
            self._started[id(module)] = time.perf_counter()

    def _post_for(self, part: str) -> Any:
        def post(module: torch.nn.Module, _args: Any, _out: Any) -> None:
            if self.phase is not None:
                into = self.spent.setdefault(self.phase, {})
                into[part] = into.get(part, 0.0) + time.perf_counter() - self._started.pop(id(module))
        return post

    def milliseconds(self, phase: str, total_seconds: float, per: int = 1) -> dict[str, float]:
        """Milliseconds per part of `phase` (divided by `per` calls), with routed experts and the rest."""
        ms = {k: 1000 * v / per for k, v in self.spent.get(phase, {}).items()}
        ms["routed_experts_and_routing"] = ms.pop("moe_block", 0.0) - ms.get("shared_experts", 0.0)
        ms["everything_else"] = 1000 * total_seconds / per - sum(ms.values())
        return {k: round(v, 2) for k, v in ms.items()}


def weight_gbps(decode_ms: dict[str, float], held_by_part: dict[str, int]) -> dict[str, float]:
    """GB/s at which each part streams its (held) weights during decode: bytes / time per token."""
    part_bytes = {
        "attention": held_by_part.get("attention", 0),
        "dense_mlp": held_by_part.get("dense_mlp", 0),
        "shared_experts": held_by_part.get("shared_experts", 0),
        "routed_experts_and_routing": held_by_part.get("routed_experts_active", 0) + held_by_part.get("router", 0),
        "lm_head": held_by_part.get("lm_head", 0),
    }
    return {k: round(b / (decode_ms[k] / 1000) / 1e9, 2) for k, b in part_bytes.items() if decode_ms.get(k, 0) > 0}


def kt_breakdown_worker(gguf: Path, rules: str, dtype_name: str, prompt_len: int, gen_len: int,
                        threads: int | None) -> dict[str, Any]:
    """Where kt's torch path spends a prefill and a decode step, and the weight bandwidth per part.

    Loads exactly as ``kt bench`` does (`open_runtime`, `Session`, same prompt, same
    warm-up) and times the parts with `PartTimer`. This is a separate process from the
    ``kt bench`` runs, whose figures stay free of any instrumentation. Dividing each
    part's bytes (as held, from `bytes_per_token`) by its time per decoded token gives
    the rate at which that part streams its weights, to set against the machine's read
    bandwidth.
    """
    from kt_core.runtime.generate import Session
    from kt_core.runtime.session_setup import open_runtime

    rt = open_runtime(model=None, gguf=str(gguf), rules=rules, device_map=[], dtype=dtype_name, threads=threads,
                      quiet=True)
    model, config = rt.loaded.model, rt.loaded.config
    timer = PartTimer(model, int(getattr(config, "first_k_dense_replace", 0)))
    vocab = int(config.vocab_size)
    prompt = [(i * 7919 + 13) % vocab for i in range(prompt_len)]
    Session(model, config, prompt_len + gen_len + 1).prefill(prompt[:WARMUP_TOKENS])
    session = Session(model, config, prompt_len + gen_len + 1)
    timer.phase = "prefill"
    t0 = time.perf_counter()
    token = greedy_token(session.prefill(prompt)[0])
    prefill_s = time.perf_counter() - t0
    timer.phase = "decode"
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(gen_len):
        token = greedy_token(session.decode(token))
    decode_s = time.perf_counter() - t0
    cpu_per_wall = (time.process_time() - c0) / decode_s
    timer.phase = None
    decode_ms = timer.milliseconds("decode", decode_s, gen_len)
    held = bytes_per_token(gguf, getattr(torch, dtype_name))["held"]["by_part"]
    return {
        "load_seconds": round(rt.load_seconds, 3),
        "prefill_tokens_per_s": prompt_len / prefill_s,
        "prefill_ms": timer.milliseconds("prefill", prefill_s),
        "decode_tokens_per_s": gen_len / decode_s,
        "decode_ms_per_token": decode_ms,
        "decode_weight_gbps": weight_gbps(decode_ms, held),
        "threads": torch.get_num_threads(),
        "run_cpu_per_wall": round(cpu_per_wall, 2),
        "loadavg": os.getloadavg(),
    }


# -- driver --------------------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(float(r[key]) for r in runs), 3)


def summarize(runs: list[dict[str, Any]], roofline_tok_s: float, stored_roofline_tok_s: float) -> dict[str, Any]:
    """Medians of the figures that matter, the best run, and decode as a share of the rooflines.

    The held roofline is the bound of a path that holds the weights dequantized (kt's torch
    path, transformers); the stored roofline that of one reading the GGUF's quantized
    bytes (kt's CPU engine, llama.cpp).

    The median is the figure to quote; the best run is reported beside it because on a
    shared machine other users' load only ever slows a run down, so the best of several
    is the closest to what the code does when it has the cores.
    """
    decode = _median(runs, "decode_tokens_per_s")
    best = max(float(r["decode_tokens_per_s"]) for r in runs)
    return {
        "decode_tokens_per_s": decode,
        "decode_tokens_per_s_best": round(best, 3),
        "prefill_tokens_per_s": _median(runs, "prefill_tokens_per_s"),
        "prefill_tokens_per_s_best": round(max(float(r["prefill_tokens_per_s"]) for r in runs), 3),
        "load_seconds": _median(runs, "load_seconds"),
        "peak_rss_mib": _median(runs, "peak_rss_mib"),
        "percent_of_held_roofline": round(100 * decode / roofline_tok_s, 1),
        "percent_of_held_roofline_best": round(100 * best / roofline_tok_s, 1),
        "percent_of_stored_roofline": round(100 * decode / stored_roofline_tok_s, 1),
        "loadavg_1min_median": round(statistics.median(r["loadavg_before"][0] for r in runs), 2),
        "decode_tokens_per_s_all": [round(r["decode_tokens_per_s"], 3) for r in runs],
        "prefill_tokens_per_s_all": [round(r["prefill_tokens_per_s"], 2) for r in runs],
        "process_cpu_per_wall_all": [r.get("process_cpu_per_wall") for r in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="fresh processes per configuration (medians reported)")
    parser.add_argument("--threads", type=int, help="torch threads for every measurement (default: torch's choice)")
    parser.add_argument("--rules", default="deepseek-v2-lite-cpu,deepseek-v2-lite-cpu-torch",
                        help="kt rule files to measure, comma-separated (default: the CPU engine and the torch path)")
    parser.add_argument("--llama-bench", type=Path, metavar="BINARY",
                        help="also run llama.cpp's llama-bench from this path on the same file (an outside baseline)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--experts-implementations", default=",".join(EXPERTS_IMPLEMENTATIONS),
                        help="transformers experts implementations to measure, comma-separated ('' for none)")
    parser.add_argument("--skip-kt", action="store_true")
    parser.add_argument("--bandwidth-gib", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement process")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--breakdown", action="store_true",
                        help="also run one kt process that times each part of a decode step (forward hooks)")
    parser.add_argument("--hf-worker", metavar="IMPL", help=argparse.SUPPRESS)
    parser.add_argument("--kt-breakdown-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    if args.hf_worker:
        print(json.dumps(hf_worker(args.gguf, args.hf_worker, args.prompt_len, args.gen_len, dtype, args.threads)))
        return 0
    if args.kt_breakdown_worker:
        print(json.dumps(kt_breakdown_worker(args.gguf, args.rules, args.dtype, args.prompt_len, args.gen_len,
                                             args.threads)))
        return 0

    threads = args.threads or torch.get_num_threads()
    started = time.perf_counter()
    report: dict[str, Any] = {"gguf": str(args.gguf), "gguf_bytes": args.gguf.stat().st_size,
                              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeat": args.repeat,
                              "machine": machine_facts(threads)}
    budget = bytes_per_token(args.gguf, dtype)
    bandwidth = [asdict(measure_read_bandwidth(args.bandwidth_gib, 7, threads))]
    gemv = asdict(measure_gemv_bandwidth(args.bandwidth_gib, 3, threads, dtype=dtype))
    print(f"bandwidth {bandwidth[0]['gbps_median']} GB/s, F.linear {gemv['gbps_median']} GB/s", file=sys.stderr)

    # Round-robin over the configurations, so that a burst of load from the machine's other
    # users is spread over all of them rather than falling on one.
    configs: list[tuple[str, list[str]]] = []
    if not args.skip_kt:
        for rules in [r for r in args.rules.split(",") if r]:
            configs.append((f"kt[{rules}]", kt_bench_cmd(args.gguf, rules, args)))
    for impl in [s for s in args.experts_implementations.split(",") if s]:
        cmd = [sys.executable, str(Path(__file__).resolve()), str(args.gguf), "--hf-worker", impl,
               "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--dtype", args.dtype]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        configs.append((f"transformers_{impl.replace('/', '+')}", cmd))
    measurements: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in configs}
    for i in range(args.repeat):
        for key, cmd in configs:
            # A short bandwidth probe right before each process: what the neighbours left us.
            probe = measure_read_bandwidth(min(1.0, args.bandwidth_gib), 3, threads)
            run = run_json_process(cmd, args.timeout)
            run["read_bandwidth_gbps_before"] = probe.gbps_median
            measurements[key].append(run)
            print(f"{key} #{i}: {run}", file=sys.stderr)
    if args.llama_bench is not None:
        try:
            report["llama_cpp"] = llama_bench(args.llama_bench, args.gguf, args, threads)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            report["llama_cpp"] = {"error": str(exc)[-2000:]}  # an outside tool failing must not lose kt's figures
        print(f"llama.cpp: {report['llama_cpp']}", file=sys.stderr)
    if args.breakdown:
        cmd = [sys.executable, str(Path(__file__).resolve()), str(args.gguf), "--kt-breakdown-worker",
               "--rules", args.rules.split(",")[-1], "--dtype", args.dtype, "--prompt-len", str(args.prompt_len),
               "--gen-len", str(args.gen_len)] + (["--threads", str(args.threads)] if args.threads else [])
        report["kt_decode_breakdown"] = run_json_process(cmd, args.timeout)
        print(f"breakdown: {report['kt_decode_breakdown']}", file=sys.stderr)
    bandwidth.append(asdict(measure_read_bandwidth(args.bandwidth_gib, 7, threads)))
    gemv_end = asdict(measure_gemv_bandwidth(args.bandwidth_gib, 3, threads, dtype=dtype))

    samples = [b["gbps_median"] for b in bandwidth] + [r["read_bandwidth_gbps_before"] for v in measurements.values() for r in v]
    read_gbps = statistics.median(samples)
    linear_gbps = statistics.median([gemv["gbps_median"], gemv_end["gbps_median"]])
    held_bound = read_gbps * 1e9 / budget["held"]["total_bytes"]
    stored_bound = read_gbps * 1e9 / budget["stored"]["total_bytes"]
    report["roofline"] = {
        "read_bandwidth_gbps": round(read_gbps, 2),
        "read_bandwidth_samples_gbps": samples,
        "bandwidth_measurements": bandwidth,
        "torch_linear_1token_gbps": round(linear_gbps, 2),
        "torch_linear_1token_measurements": [gemv, gemv_end],
        "bytes_per_token": budget,
        "decode_tokens_per_s_bound_held": round(held_bound, 2),
        "decode_tokens_per_s_bound_stored": round(stored_bound, 2),
        "decode_tokens_per_s_bound_torch_linear": round(linear_gbps * 1e9 / budget["held"]["total_bytes"], 2),
        "note": ("bound_held: measured read bandwidth / bytes per token as kt's torch path holds the weights "
                 f"({args.dtype}); bound_stored: the same for the GGUF's quantized bytes (the bound of an engine "
                 "computing on the blocks); bound_torch_linear: the rate PyTorch's one-token F.linear streams "
                 f"{args.dtype} weights here, i.e. the ceiling of any path made of torch matmuls"),
    }
    report["results"] = {k: summarize(v, held_bound, stored_bound) for k, v in measurements.items()}
    hf = {k: v for k, v in report["results"].items() if k.startswith("transformers_")}
    if hf:
        report["transformers_best"] = max(hf, key=lambda k: hf[k]["decode_tokens_per_s"])
    report["runs"] = measurements
    report["loadavg_end"] = os.getloadavg()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
