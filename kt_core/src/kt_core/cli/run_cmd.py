"""`kt generate`, `kt chat` and `kt bench`: run a model from rules."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Mapping

from kt_core.errors import KtUserError
from kt_core.runtime.generate import GenerationResult, Session, generate
from kt_core.runtime.memory import memory_report
from kt_core.runtime.sampling import SamplingConfig, greedy_token
from kt_core.runtime.session_setup import DTYPES, eos_ids, open_runtime


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (config + safetensors), .gguf file, or built-in config name")
    p.add_argument("--gguf", help="GGUF weights (config/tokenizer from --model when given, else from the file)")
    p.add_argument("--rules", required=True, help="rule file path or shipped rule name")
    p.add_argument("--device-map", action="append", default=[], metavar="FROM=TO", help="remap a device (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of activations and kept weights")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    # kt bench sizes its cache from --prompt-len and --gen-len, so only generate/chat take it.
    p.add_argument("--max-length", type=int, default=4096, help="KV cache size in tokens")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT is generated")


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="generate text from a prompt")
    _model_args(gen)
    _sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user message")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(handler=run_generate)

    chat = subparsers.add_parser("chat", help="interactive multi-turn chat (streams; keeps the cache between turns)")
    _model_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(handler=run_chat)

    bench = subparsers.add_parser("bench", help="measure prefill and decode tokens/s, load time and peak RSS")
    _model_args(bench)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--gen-len", type=int, default=32)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(handler=run_bench)


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    """Check the generation arguments before anything is loaded, so a typo costs no load time."""
    if args.max_new_tokens < 0:
        raise KtUserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.max_length < 1:
        raise KtUserError(f"--max-length must be >= 1, got {args.max_length}")
    if "" in args.stop:
        raise KtUserError("--stop TEXT must not be empty (an empty string would stop at the first token)")
    try:
        return SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        raise KtUserError(str(exc)) from None


def _runtime(args: argparse.Namespace, quiet: bool = False):
    return open_runtime(model=args.model, gguf=args.gguf, rules=args.rules, device_map=args.device_map,
                        dtype=args.dtype, threads=args.threads, quiet=quiet)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template, ready for the reply."""
    if tokenizer.chat_template is None:
        raise KtUserError("this model's tokenizer has no chat template")
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(rendered, Mapping):  # a BatchEncoding in transformers 5
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _say_if_cache_full(result: GenerationResult, max_length: int) -> None:
    if result.stop_reason == "cache_full":
        print(f"[stopped: the KV cache is full ({max_length} tokens); raise --max-length for longer output]",
              file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    rt = _runtime(args, quiet=args.json)
    tok = rt.tokenizer
    if args.chat_template:
        prompt_ids = chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)
    session = Session(rt.loaded.model, rt.loaded.config, args.max_length)
    stream = None if args.json else (lambda s: print(s, end="", flush=True))
    result = generate(
        session, list(prompt_ids), max_new_tokens=args.max_new_tokens, sampling=sampling,
        eos_ids=eos_ids(tok, rt.loaded.config), stop_strings=args.stop,
        decode_text=lambda ids: tok.decode(ids, skip_special_tokens=True), on_text=stream,
    )
    if args.json:
        print(json.dumps({
            "prompt_tokens": result.prompt_tokens, "tokens": result.tokens, "text": result.text,
            "stop_reason": result.stop_reason, "prefill_tokens_per_s": result.prefill_tokens_per_s,
            "decode_tokens_per_s": result.decode_tokens_per_s, "load_seconds": rt.load_seconds,
        }))
    else:
        print()
        _say_if_cache_full(result, args.max_length)
        print(f"[{result.prompt_tokens} prompt tokens, {len(result.tokens)} generated; prefill "
              f"{result.prefill_tokens_per_s:.1f} tok/s, decode {result.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    rt = _runtime(args)
    tok = rt.tokenizer
    if tok.chat_template is None:
        raise KtUserError("this model's tokenizer has no chat template; use kt generate")
    session = Session(rt.loaded.model, rt.loaded.config, args.max_length)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kt chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            return 0
        messages.append({"role": "user", "content": line})
        ids = chat_prompt_ids(tok, messages)
        print("kt> ", end="", flush=True)
        result = generate(
            session, list(ids), max_new_tokens=args.max_new_tokens, sampling=sampling,
            eos_ids=eos_ids(tok, rt.loaded.config), stop_strings=args.stop,
            decode_text=lambda t: tok.decode(t, skip_special_tokens=True),
            on_text=lambda s: print(s, end="", flush=True),
        )
        print()
        _say_if_cache_full(result, args.max_length)
        print(f"[reused {result.reused_prompt_tokens}/{result.prompt_tokens} prompt tokens from the cache; "
              f"decode {result.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
        messages.append({"role": "assistant", "content": result.text})


def run_bench(args: argparse.Namespace) -> int:
    if args.prompt_len < 1 or args.gen_len < 1:
        raise KtUserError("--prompt-len and --gen-len must be >= 1")
    rt = _runtime(args, quiet=args.json)
    vocab = rt.loaded.config.vocab_size
    # A fixed pseudo-random prompt: benchmark numbers must not depend on a tokenizer.
    prompt = [(i * 7919 + 13) % vocab for i in range(args.prompt_len)]
    session = Session(rt.loaded.model, rt.loaded.config, args.prompt_len + args.gen_len + 1)
    session.prefill(prompt[:8])  # warm-up: first calls pay one-time allocation costs
    session = Session(rt.loaded.model, rt.loaded.config, args.prompt_len + args.gen_len + 1)
    t0 = time.perf_counter()
    logits, _ = session.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    token = greedy_token(logits)
    t0 = time.perf_counter()
    for _ in range(args.gen_len):
        token = greedy_token(session.decode(token))
    decode_s = time.perf_counter() - t0
    report = {
        "rules": args.rules, "model": args.gguf or args.model, "dtype": args.dtype,
        "threads": __import__("torch").get_num_threads(),
        "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "load_seconds": round(rt.load_seconds, 3),
        "prefill_tokens_per_s": args.prompt_len / prefill_s,
        "decode_tokens_per_s": args.gen_len / decode_s,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "memory": memory_report(rt.loaded.model),
    }
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(report)
    return 0


def _flatten(report: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested report sections as dotted keys (``memory.backends_mib.KExpertsCPU.mapped``)."""
    rows: list[tuple[str, object]] = []
    for key, value in report.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _print_report(report: dict) -> None:
    """`kt bench`'s report as aligned ``key  value`` lines."""
    rows = _flatten(report)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:.2f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
