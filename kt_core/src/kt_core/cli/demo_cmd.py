"""`kt demo`: plan and run a tiny built-in model end to end, with nothing to download.

The model (DeepSeek-V2-Lite's architecture, scaled down, seeded random weights) and its
tokenizer are generated deterministically and written once as a Q8_0 GGUF to the cache;
then the demo shows the plan a shipped rule file makes for it, loads it through the same
path as any GGUF model, and generates. The weights are random, so the text is noise:
what the demo shows is the path, and the speed.
"""

from __future__ import annotations

import argparse
import sys

from kt_core.cli.plan_view import format_plan
from kt_core.convert import write_gguf
from kt_core.demo.model import DEMO_VERSION, cache_dir, demo_config, demo_weights
from kt_core.demo.tokenizer import build_demo_tokenizer
from kt_core.errors import KtUserError
from kt_core.plugins import get_registry
from kt_core.runtime.generate import Session, generate
from kt_core.runtime.sampling import SamplingConfig
from kt_core.runtime.session_setup import eos_ids, open_runtime


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole flow on a tiny built-in model (no download)")
    p.add_argument("--rules", default="deepseek-v2-lite-cpu", help="rule file path or shipped rule name")
    p.add_argument("--prompt", default="Mixture-of-Experts models route every token")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device-map", action="append", default=[], metavar="FROM=TO")
    p.add_argument("--rebuild", action="store_true", help="regenerate the cached demo model")
    p.set_defaults(handler=run)


def demo_model_path(rebuild: bool = False) -> str:
    """The cached demo GGUF, written on first use."""
    path = cache_dir() / f"kt-demo-v{DEMO_VERSION}-deepseek-v2-lite-tiny-Q8_0.gguf"
    if rebuild or not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"building the demo model (once) → {path}", file=sys.stderr)
            tokenizer = build_demo_tokenizer()
            config = demo_config(tokenizer)
            write_gguf(path, demo_weights(config), config, get_registry(), ggml_type="Q8_0", tokenizer=tokenizer,
                       name="kt-demo-deepseek-v2-lite-tiny")
        except OSError as exc:
            raise KtUserError(f"cannot write the demo model to {path.parent} ({exc.strerror or exc}); "
                              "set KT_CACHE to a writable folder") from None
    return str(path)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise KtUserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    path = demo_model_path(args.rebuild)
    rt = open_runtime(model=None, gguf=path, rules=args.rules, device_map=args.device_map, dtype="float32", threads=None)
    print(format_plan(rt.loaded.plan, registry=get_registry()))
    print(f"\nloaded {path} in {rt.load_seconds:.2f} s; generating (random weights: the text is noise)\n")
    tok = rt.tokenizer
    session = Session(rt.loaded.model, rt.loaded.config, 512)
    print(args.prompt, end="", flush=True)
    result = generate(
        session, tok.encode(args.prompt), max_new_tokens=args.max_new_tokens, sampling=SamplingConfig(),
        eos_ids=eos_ids(tok, rt.loaded.config), decode_text=lambda ids: tok.decode(ids, skip_special_tokens=True),
        on_text=lambda s: print(s, end="", flush=True),
    )
    print(f"\n\n[{result.prompt_tokens} prompt tokens, {len(result.tokens)} generated; prefill "
          f"{result.prefill_tokens_per_s:.1f} tok/s, decode {result.decode_tokens_per_s:.1f} tok/s]")
    return 0
