"""What is in a GGUF file, as data (`inspect_gguf`) and as a terminal report (`format_inspect`).

Backs ``kt gguf inspect``: the first thing to run on a downloaded model to see its
architecture, quantization mix and size, or why kt refuses it. The report is built from
the header and tensor table only, so it is instant even for a 400 GiB model. Huge
metadata arrays (the tokenizer's vocabulary, scores, merges) are summarized by type and
length instead of printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kt_core.weights.gguf_file import open_gguf

MAX_ARRAY_ITEMS = 32
"""Metadata arrays longer than this are summarized by type and length."""
MAX_TEXT_WIDTH = 72
"""Metadata values longer than this are shortened in the text report (not in JSON)."""


def _clean(value: Any) -> Any:
    """Strings that were not valid UTF-8 (kept losslessly while reading) made printable."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of the GGUF file (or split model) at `path`.

    Keys: ``path``, ``parts``, ``version``, ``architecture``, ``file_bytes``,
    ``metadata`` (key → value, long arrays as ``{"type", "length", "summarized"}``),
    ``metadata_types``, ``tensor_count``, ``parameters``, ``tensor_bytes``, ``types``
    (GGML type → ``{"count", "bytes"}``, largest first) and ``tensors`` (each with
    ``name``, ``type``, ``shape``, ``bytes``, ``part``).
    """
    with open_gguf(path) as gguf:
        metadata: dict[str, Any] = {}
        for key, value in gguf.metadata.items():
            if isinstance(value, list) and len(value) > MAX_ARRAY_ITEMS:
                metadata[key] = {"type": gguf.metadata_types[key], "length": len(value), "summarized": True}
            else:
                metadata[key] = _clean(value)
        part_of = {p: i for i, p in enumerate(gguf.paths)}
        tensors = [
            {
                "name": t.name,
                "type": t.ggml_type,
                "shape": list(t.shape),
                "bytes": t.nbytes,
                "part": part_of[t.path] + 1,
            }
            for t in gguf
        ]
        types: dict[str, dict[str, int]] = {}
        for t in gguf:
            entry = types.setdefault(t.ggml_type, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += t.nbytes
        return {
            "path": str(gguf.path),
            "parts": [str(p) for p in gguf.paths],
            "version": gguf.version,
            "architecture": gguf.architecture,
            "file_bytes": gguf.file_size,
            "metadata": metadata,
            "metadata_types": dict(gguf.metadata_types),
            "tensor_count": len(tensors),
            "parameters": sum(t.n_elements for t in gguf),
            "tensor_bytes": sum(t.nbytes for t in gguf),
            "types": dict(sorted(types.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))),
            "tensors": tensors,
        }


def format_bytes(n: int) -> str:
    """``1.50 GiB``-style size."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _format_count(n: int) -> str:
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _shorten(text: str, width: int = MAX_TEXT_WIDTH) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else f"{text[: width - 1]}… ({len(text)} chars)"


def _format_value(value: Any) -> str:
    if isinstance(value, dict) and value.get("summarized"):
        return f"<{value['type']}, {value['length']} items>"
    if isinstance(value, str):
        return _shorten(repr(value)[1:-1] if "\n" in value else value)
    return _shorten(repr(value))


def _table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_inspect(report: dict[str, Any]) -> str:
    """`inspect_gguf`'s report as a readable terminal text: summary, metadata, types, tensors."""
    lines: list[str] = []
    parts = report["parts"]
    lines.append(f"file:          {report['path']}" + (f"  (split into {len(parts)} parts)" if len(parts) > 1 else ""))
    lines.append(f"gguf version:  {report['version']}")
    lines.append(f"architecture:  {report['architecture'] or '(not set)'}")
    lines.append(f"tensors:       {report['tensor_count']}  ({_format_count(report['parameters'])} parameters)")
    lines.append(f"size:          {format_bytes(report['file_bytes'])} on disk, {format_bytes(report['tensor_bytes'])} of tensor data")

    lines += ["", f"metadata ({len(report['metadata'])} keys)"]
    meta_rows = [
        [key, report["metadata_types"].get(key, ""), _format_value(value)] for key, value in report["metadata"].items()
    ]
    lines += _table(["KEY", "TYPE", "VALUE"], meta_rows)

    total = report["tensor_bytes"] or 1
    lines += ["", "tensor types"]
    type_rows = [
        [name, str(t["count"]), format_bytes(t["bytes"]), f"{100 * t['bytes'] / total:.1f}%"]
        for name, t in report["types"].items()
    ]
    lines += _table(["TYPE", "TENSORS", "SIZE", "SHARE"], type_rows, right=frozenset({1, 2, 3}))

    lines += ["", "tensors"]
    multi = len(parts) > 1
    tensor_rows = [
        [t["name"], t["type"], "×".join(map(str, t["shape"])) or "scalar", format_bytes(t["bytes"])]
        + ([str(t["part"])] if multi else [])
        for t in report["tensors"]
    ]
    headers = ["NAME", "TYPE", "SHAPE", "SIZE"] + (["PART"] if multi else [])
    lines += _table(headers, tensor_rows, right=frozenset({3, 4}))
    return "\n".join(lines) + "\n"
