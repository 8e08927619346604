"""Fuzzing the GGUF reader: damaged files give `GGUFFormatError` and nothing else.

A small valid file (metadata of every kind, plain and quantized tensors) is damaged by
overwriting header bytes, planting extreme 32/64-bit values (absurd counts, lengths,
offsets, type ids) and truncating. Opening it must either succeed with a usable tensor
table or raise `GGUFFormatError`: no other exception, no hang, no huge allocation.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kt_core.weights.gguf_file import GGUFFormatError, open_gguf
from kt_core.weights.gguf_source import GGUFSource, supported_types

EXTREMES_U32 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 31, 32, 64, 255, 2**31 - 1, 2**31, 2**32 - 1]
EXTREMES_U64 = EXTREMES_U32 + [2**32, 2**40, 2**62, 2**63, 2**64 - 1]
SECONDS_PER_EXAMPLE = 10


def _valid_file() -> tuple[bytes, int, int]:
    """A small valid GGUF file's bytes, where its tensor data starts, and where it ends."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.gguf"
        writer = gguf.GGUFWriter(str(path), "deepseek2")
        writer.add_block_count(1)
        writer.add_uint16("t.u16", 7)
        writer.add_float32("t.f32", 0.5)
        writer.add_bool("t.bool", True)
        writer.add_string("t.str", "text")
        writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc"])
        writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
        writer.add_array("t.nested", [[1, 2], [3]])
        writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
        writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float16))
        writer.add_tensor(
            "blk.0.ffn_down_exps.weight", np.zeros((2, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0
        )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open_gguf(path) as f:
            start = min(t.offset for t in f)
            end = max(t.offset + t.nbytes for t in f)
        return path.read_bytes(), start, end


SEED, DATA_START, DATA_END = _valid_file()


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: an alarm interrupts an open that takes far too long."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"opening a damaged GGUF file took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def open_and_use(path: Path) -> None:
    """Open `path` and touch everything a loader would; only GGUFFormatError may escape."""
    with time_limit(SECONDS_PER_EXAMPLE):
        try:
            f = open_gguf(path)
        except GGUFFormatError as e:
            assert str(path) in str(e)
            return
        with f:
            source = GGUFSource(f)
            for tensor in f:
                assert tensor.data.nbytes == tensor.nbytes
                assert tensor.offset + tensor.nbytes <= path.stat().st_size
                if tensor.ggml_type in supported_types():  # plain, or through dequantize
                    assert source.load(tensor.name).shape == torch.Size(tensor.shape)


mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, DATA_START - 1), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, DATA_START - 4), st.sampled_from(EXTREMES_U32)),
    st.tuples(st.just("u64"), st.integers(0, DATA_START - 8), st.sampled_from(EXTREMES_U64)),
)


def damage(data: bytes, mutations: list[tuple[str, int, int]], keep: int | None) -> bytes:
    raw = bytearray(data)
    for kind, at, value in mutations:
        if kind == "byte":
            raw[at] = value
        elif kind == "u32":
            raw[at : at + 4] = struct.pack("<I", value)
        else:
            raw[at : at + 8] = struct.pack("<Q", value)
    return bytes(raw[:keep] if keep is not None else raw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_seed_file_is_valid(folder: Path) -> None:
    path = folder / "seed.gguf"
    path.write_bytes(SEED)
    with open_gguf(path) as f:
        assert len(f.tensors) == 3 and f.metadata["t.nested"] == [[1, 2], [3]]


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutations=st.lists(mutation, min_size=0, max_size=6),
    keep=st.one_of(st.none(), st.integers(0, len(SEED) - 1)),
)
def test_damaged_files_only_raise_format_errors(folder: Path, mutations: list[tuple[str, int, int]], keep: int | None) -> None:
    path = folder / "damaged.gguf"
    path.write_bytes(damage(SEED, mutations, keep))
    open_and_use(path)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.integers(0, len(SEED) - 1))
def test_truncation_into_tensor_data_is_detected(folder: Path, keep: int) -> None:
    """Cutting the file anywhere before the end of the last tensor's bytes is an error."""
    path = folder / "truncated.gguf"
    path.write_bytes(SEED[:keep])
    if keep < DATA_END:
        with pytest.raises(GGUFFormatError):
            open_gguf(path)
    else:
        with open_gguf(path) as f:
            assert len(f.tensors) == 3
