"""Tests for `kt_core.quant.dequantize` against gguf-py's numpy reference implementation.

Every comparison is bit-exact (`torch.equal` on float32): the decoders perform the same
float32 operations in the same order as ggml/gguf-py, so no tolerance is needed. Inputs
are random bytes (every bit pattern of the quants is legal) with the float scale fields
overwritten by finite values, as in real weights; random bytes there would make NaN/inf
scales whose products gguf-py and torch may not even agree on the sign of.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from kt_core.errors import KtUserError
from kt_core.quant import dequantize as dequantize_module
from kt_core.quant.dequantize import (
    SUPPORTED_TYPES,
    GGMLDataSizeError,
    UnsupportedGGMLTypeError,
    dequantize,
)
from kt_core.quant.quantize import QUANTIZABLE_TYPES, quantize

REQUIRED_TYPES = {
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
}  # fmt: skip

FLOAT_TYPES = ("F32", "F16", "BF16")

SCALE_FIELDS: dict[str, tuple[tuple[int, type], ...]] = {
    "Q4_0": ((0, np.float16),),
    "Q4_1": ((0, np.float16), (2, np.float16)),
    "Q5_0": ((0, np.float16),),
    "Q5_1": ((0, np.float16), (2, np.float16)),
    "Q8_0": ((0, np.float16),),
    "Q2_K": ((80, np.float16), (82, np.float16)),
    "Q3_K": ((108, np.float16),),
    "Q4_K": ((0, np.float16), (2, np.float16)),
    "Q5_K": ((0, np.float16), (2, np.float16)),
    "Q6_K": ((208, np.float16),),
    "Q8_K": ((0, np.float32),),
    "IQ4_NL": ((0, np.float16),),
    "IQ4_XS": ((0, np.float16),),
}
"""Byte offset and type of each block's float scale/min fields (from ggml's block structs)."""

# gguf-py can produce real quantized data (not just random bytes) for these.
GGUF_PY_QUANTIZABLE = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def sizes(name: str) -> tuple[int, int]:
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]]


def random_tensor_bytes(name: str, n_elements: int, rng: np.random.Generator) -> np.ndarray:
    """Flat uint8 bytes of a valid `name` tensor of `n_elements` elements."""
    if name in FLOAT_TYPES:
        values = rng.uniform(-2, 2, size=n_elements).astype(np.float32)
        if name == "F32":
            return values.view(np.uint8)
        if name == "F16":
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block_size, type_size = sizes(name)
    n_blocks = n_elements // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset, float_type in SCALE_FIELDS[name]:
        width = np.dtype(float_type).itemsize
        scales = rng.uniform(-2, 2, size=n_blocks).astype(float_type)
        blocks[:, offset : offset + width] = scales.view(np.uint8).reshape(n_blocks, width)
    return blocks.reshape(-1)


def reference(name: str, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf-py's dequantization of flat bytes `data` as a float32 tensor of `shape`."""
    qtype = GGMLQuantizationType[name]
    if name == "Q8_K":
        # gguf-py has no Q8_K decoder; ggml's dequantize_row_q8_K is y = d * q per block.
        blocks = data.reshape(-1, sizes(name)[1])
        values = blocks[:, 0:4].copy().view(np.float32) * blocks[:, 4:260].view(np.int8).astype(np.float32)
    elif name == "F32":
        values = gguf.quants.dequantize(data.view(np.float32), qtype)
    elif name == "F16":
        values = gguf.quants.dequantize(data.view(np.float16), qtype)
    else:
        block_size, type_size = sizes(name)
        rows = data.reshape(-1, shape[-1] // block_size * type_size)
        values = gguf.quants.dequantize(rows, qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def shape_for(name: str, dims: int, blocks_per_row: int = 3) -> tuple[int, ...]:
    row = sizes(name)[0] * blocks_per_row
    return {1: (row,), 2: (5, row), 3: (4, 3, row)}[dims]


def test_supported_types_cover_the_required_formats() -> None:
    assert REQUIRED_TYPES <= SUPPORTED_TYPES
    assert all(isinstance(name, str) for name in SUPPORTED_TYPES)


@pytest.mark.parametrize("name", sorted(SUPPORTED_TYPES))
def test_bit_exact_against_gguf_py(name: str) -> None:
    rng = np.random.default_rng(sum(map(ord, name)))
    shape = shape_for(name, 2, blocks_per_row=64 if sizes(name)[0] == 1 else 24)
    data = random_tensor_bytes(name, math.prod(shape), rng)

    result = dequantize(data, name, shape)

    assert result.dtype == torch.float32
    assert result.shape == shape
    assert torch.equal(result, reference(name, data, shape))


@pytest.mark.parametrize("name", sorted(QUANTIZABLE_TYPES))
def test_bit_exact_against_gguf_py_on_blocks_kt_writes(name: str) -> None:
    """Real quantized data, not random bytes: what `kt convert`'s quantizers produce for
    gaussian weights with outlier rows and an all-zero row decodes bit-exactly too."""
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(3))
    x[1] *= 40.0
    x[2] = 0.0
    x[3] = x[3].abs()
    data = quantize(x, name)
    assert torch.equal(dequantize(data, name, tuple(x.shape)), reference(name, data, tuple(x.shape)))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(SUPPORTED_TYPES))
def test_shapes_of_one_two_and_three_dims(name: str, dims: int) -> None:
    shape = shape_for(name, dims)
    data = random_tensor_bytes(name, math.prod(shape), np.random.default_rng(dims))

    result = dequantize(data, name, shape)

    assert result.shape == shape
    assert torch.equal(result, reference(name, data, shape))


@pytest.mark.parametrize("name", sorted(SUPPORTED_TYPES))
def test_a_single_block(name: str) -> None:
    shape = (sizes(name)[0],)
    data = random_tensor_bytes(name, shape[0], np.random.default_rng(4))
    assert torch.equal(dequantize(data, name, shape), reference(name, data, shape))


def test_stacked_experts_slice_like_their_own_tensors() -> None:
    """A 3-D expert stack decodes so that expert i equals decoding expert i's bytes alone."""
    name, shape = "Q4_K", (4, 2, 512)
    data = random_tensor_bytes(name, math.prod(shape), np.random.default_rng(7))
    stacked = dequantize(data, name, shape)
    per_expert = len(data) // shape[0]
    for expert in range(shape[0]):
        alone = dequantize(data[expert * per_expert : (expert + 1) * per_expert], name, shape[1:])
        assert torch.equal(stacked[expert], alone)


@pytest.mark.parametrize("name", sorted(SUPPORTED_TYPES - set(FLOAT_TYPES)))
def test_many_chunks_with_a_partial_last_one(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink chunks so a small tensor spans several of them, the last one partial.
    monkeypatch.setattr(dequantize_module, "_chunk_elements", lambda device: 8 * 256)
    shape = (7, sizes(name)[0] * 9)
    data = random_tensor_bytes(name, math.prod(shape), np.random.default_rng(3))

    assert torch.equal(dequantize(data, name, shape), reference(name, data, shape))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(SUPPORTED_TYPES - set(FLOAT_TYPES))),
    n_blocks=st.integers(min_value=1, max_value=70),
    chunk_blocks=st.integers(min_value=1, max_value=40),
)
def test_any_chunk_size_gives_the_same_result(name: str, n_blocks: int, chunk_blocks: int) -> None:
    block_size = sizes(name)[0]
    shape = (n_blocks * block_size,)
    data = random_tensor_bytes(name, shape[0], np.random.default_rng(n_blocks))
    original = dequantize_module._chunk_elements
    dequantize_module._chunk_elements = lambda device: chunk_blocks * block_size
    try:
        result = dequantize(data, name, shape)
    finally:
        dequantize_module._chunk_elements = original
    assert torch.equal(result, reference(name, data, shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q4_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS"])
def test_other_output_dtypes_equal_the_float32_result_cast(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dequantize_module, "_chunk_elements", lambda device: 8 * 256)  # exercise the scratch path
    shape = shape_for(name, 3)
    data = random_tensor_bytes(name, math.prod(shape), np.random.default_rng(11))

    result = dequantize(data, name, shape, dtype=dtype)

    assert result.dtype == dtype
    assert torch.equal(result, dequantize(data, name, shape).to(dtype))


def test_accepts_torch_tensors_enum_types_and_lowercase_names() -> None:
    shape = (2, 64)
    data = random_tensor_bytes("Q8_0", 128, np.random.default_rng(0))
    expected = reference("Q8_0", data, shape)

    assert torch.equal(dequantize(torch.from_numpy(data), GGMLQuantizationType.Q8_0, shape), expected)
    assert torch.equal(dequantize(data, "q8_0", shape, device="cpu"), expected)


def test_float_tensors_given_as_their_own_dtype() -> None:
    """GGUFReader returns F16/F32 tensors as float arrays; they are read as their bytes."""
    values = np.random.default_rng(0).uniform(-1, 1, size=(3, 8)).astype(np.float16)
    result = dequantize(values, "F16", values.shape)
    assert torch.equal(result, torch.from_numpy(values.astype(np.float32)))
    assert torch.equal(dequantize(torch.from_numpy(values), "F16", values.shape), result)


def test_result_never_aliases_the_input() -> None:
    values = np.arange(8, dtype=np.float32)
    result = dequantize(values, "F32", (8,))
    result.fill_(-1)
    assert values[3] == 3


def test_misaligned_input_is_decoded_correctly() -> None:
    data = random_tensor_bytes("Q4_K", 512, np.random.default_rng(5))
    buffer = np.zeros(len(data) + 1, dtype=np.uint8)
    buffer[1:] = data
    assert torch.equal(dequantize(buffer[1:], "Q4_K", (2, 256)), reference("Q4_K", data, (2, 256)))


def test_empty_tensor() -> None:
    result = dequantize(np.zeros(0, dtype=np.uint8), "Q4_0", (0, 32))
    assert result.shape == (0, 32)


@pytest.mark.parametrize(
    ("shape", "n_bytes"),
    [
        ((2, 32), 35),  # one byte short of two Q8_0 blocks
        ((2, 32), 69),  # one byte too many
        ((32,), 0),
        ((2, 48), 3 * 34),  # row length not a multiple of the block size
        ((), 34),
        ((-1, 32), 34),
    ],
)
def test_byte_count_or_shape_mismatch_raises(shape: tuple[int, ...], n_bytes: int) -> None:
    with pytest.raises(GGMLDataSizeError) as raised:
        dequantize(np.zeros(n_bytes, dtype=np.uint8), "Q8_0", shape)
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, KtUserError)
    assert "Q8_0" in str(raised.value)


@pytest.mark.parametrize("ggml_type", ["IQ2_XXS", GGMLQuantizationType.TQ1_0, "NOT_A_TYPE"])
def test_unsupported_type_raises_and_lists_supported_ones(ggml_type: str | GGMLQuantizationType) -> None:
    with pytest.raises(UnsupportedGGMLTypeError) as raised:
        dequantize(np.zeros(64, dtype=np.uint8), ggml_type, (64,))
    message = str(raised.value)
    assert (ggml_type.name if isinstance(ggml_type, GGMLQuantizationType) else ggml_type) in message
    assert "Q4_K" in message and "IQ4_XS" in message
    assert isinstance(raised.value, KtUserError)


def test_non_float_output_dtype_is_rejected() -> None:
    with pytest.raises(TypeError):
        dequantize(np.zeros(34, dtype=np.uint8), "Q8_0", (32,), dtype=torch.int32)


def _write_gguf(path: Path, rng: np.random.Generator) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """Write a GGUF file of 1-, 2- and 3-D tensors; returns name -> (type, torch shape, source floats)."""
    writer = gguf.GGUFWriter(path, "kt-test")
    written: dict[str, tuple[str, tuple[int, ...], np.ndarray]] = {}
    for name in (*GGUF_PY_QUANTIZABLE, "F32", "F16"):
        for dims in (1, 2, 3):
            shape = shape_for(name if name not in FLOAT_TYPES else "Q8_0", dims, blocks_per_row=2)
            source = rng.standard_normal(shape, dtype=np.float32)
            tensor_name = f"{name.lower()}.{dims}d"
            if name in ("F32", "F16"):
                writer.add_tensor(tensor_name, source.astype(np.float16 if name == "F16" else np.float32))
            else:
                qtype = GGMLQuantizationType[name]
                writer.add_tensor(tensor_name, gguf.quants.quantize(source, qtype), raw_dtype=qtype)
            written[tensor_name] = (name, shape, source)
    # K-quants and i-quants: gguf-py cannot quantize them, so store valid random blocks.
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"):
        shape = shape_for(name, 3, blocks_per_row=1)
        raw = random_tensor_bytes(name, math.prod(shape), rng).reshape(*shape[:-1], -1)
        writer.add_tensor(f"{name.lower()}.3d", raw, raw_dtype=GGMLQuantizationType[name])
        written[f"{name.lower()}.3d"] = (name, shape, np.empty(0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def test_round_trip_through_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    written = _write_gguf(path, np.random.default_rng(0))
    reader = gguf.GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(written)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only memmaps must not make torch warn
        for tensor in reader.tensors:
            name, shape, source = written[tensor.name]
            torch_shape = tuple(reversed([int(d) for d in tensor.shape]))
            assert torch_shape == shape
            assert tensor.tensor_type == GGMLQuantizationType[name]

            result = dequantize(tensor.data, tensor.tensor_type, torch_shape)

            expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            assert torch.equal(result, torch.from_numpy(expected.reshape(shape)))
            if source.size:  # gguf-py quantized it: the round trip must be close to the source
                assert torch.allclose(result, torch.from_numpy(source), atol=0.35 * float(np.abs(source).max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(SUPPORTED_TYPES))
def test_cuda_matches_cpu(name: str) -> None:
    shape = shape_for(name, 3)
    data = random_tensor_bytes(name, math.prod(shape), np.random.default_rng(1))
    on_gpu = dequantize(data, name, shape, device="cuda")
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), dequantize(data, name, shape))
