"""`kt convert`: a Hugging Face checkpoint → a GGUF file llama.cpp and kt both read."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kt_core.convert import FILE_TYPES, write_gguf
from kt_core.errors import KtUserError
from kt_core.model_config import resolve_config
from kt_core.plugins import get_registry
from kt_core.runtime.model_source import dir_tokenizer
from kt_core.weights.safetensors_source import SafetensorsSource


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face model directory to GGUF")
    p.add_argument("model_dir", metavar="HF_DIR", help="directory with config.json, *.safetensors, tokenizer")
    p.add_argument("output", metavar="OUT.gguf", type=Path)
    p.add_argument("--type", dest="ggml_type", choices=list(FILE_TYPES), default="BF16",
                   help="weight type (norms, routers and 1-D tensors stay F32)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise KtUserError(f"{model_dir}: not a directory; HF_DIR must hold config.json and *.safetensors")
    if args.output.exists() and not args.force:
        raise KtUserError(f"{args.output} exists; pass --force to overwrite it")
    registry = get_registry()
    config = resolve_config(str(model_dir), registry)
    source = SafetensorsSource(model_dir)
    tokenizer = dir_tokenizer(model_dir)
    if tokenizer is None:
        print(f"kt: warning: {model_dir} has no tokenizer; the GGUF will have none", file=sys.stderr)
    planned = write_gguf(args.output, source, config, registry, ggml_type=args.ggml_type, tokenizer=tokenizer,
                         name=model_dir.name)
    counts: dict[str, int] = {}
    for t in planned:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB, {len(planned)} tensors: {summary})")
    return 0
