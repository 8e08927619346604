"""Reading GGUF files: metadata, tensor table, zero-copy data, split parts, bad input."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from kt_core.errors import KtUserError
from kt_core.weights.gguf_file import GGUFFormatError, GGUFTensor, ggml_type_sizes, open_gguf

Q = gguf.GGMLQuantizationType
SPLIT = gguf.Keys.Split


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    raw_types: dict[str, Q] | None = None,
    kv: Callable[[gguf.GGUFWriter], None] | None = None,
    arch: str = "qwen2moe",
) -> Path:
    """Write a GGUF file with gguf-py's writer; `raw_types` marks uint8 arrays as quantized blocks."""
    writer = gguf.GGUFWriter(str(path), arch)
    if kv is not None:
        kv(writer)
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=(raw_types or {}).get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rng_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "token_embd.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(8).astype(np.float32),
        "blk.0.ffn_gate_exps.weight": rng.standard_normal((4, 6, 8)).astype(np.float16),
        # Q8_0: 2 blocks of 34 bytes per 64-element row, 3 rows -> logical shape (3, 64).
        "blk.0.ffn_down_exps.weight": rng.integers(0, 256, (3, 68), dtype=np.uint8),
    }


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = _rng_tensors()

    def kv(w: gguf.GGUFWriter) -> None:
        w.add_uint8("t.u8", 200)
        w.add_int8("t.i8", -5)
        w.add_uint16("t.u16", 65000)
        w.add_int16("t.i16", -30000)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int32("t.i32", -2_000_000_000)
        w.add_uint64("t.u64", 2**63 + 5)
        w.add_int64("t.i64", -(2**62))
        w.add_float32("t.f32", 0.5)
        w.add_float64("t.f64", 1e-300)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "héllo\nworld")
        w.add_array("t.ints", [1, 2, 3])
        w.add_array("t.floats", [0.25, -1.5])
        w.add_array("t.strs", ["a", "", "ü"])
        w.add_array("t.bools", [True, False])
        w.add_array("t.nested", [[1, 2], [3]])
        w.add_block_count(1)

    path = write_gguf(
        tmp_path / "small.gguf", tensors, raw_types={"blk.0.ffn_down_exps.weight": Q.Q8_0}, kv=kv
    )
    return path, tensors


def test_metadata_is_plain_python(small: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = small
    with open_gguf(path) as f:
        m = f.metadata
        assert f.version == 3
        assert f.architecture == "qwen2moe"
        assert m["general.architecture"] == "qwen2moe"
        assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -5, 65000, -30000)
        assert (m["t.u32"], m["t.i32"], m["t.u64"], m["t.i64"]) == (4_000_000_000, -2_000_000_000, 2**63 + 5, -(2**62))
        assert m["t.f32"] == 0.5 and m["t.f64"] == 1e-300
        assert m["t.bool"] is True
        assert m["t.str"] == "héllo\nworld"
        assert m["t.ints"] == [1, 2, 3] and type(m["t.ints"]) is list and type(m["t.ints"][0]) is int
        assert m["t.floats"] == [0.25, -1.5]
        assert m["t.strs"] == ["a", "", "ü"]
        assert m["t.bools"] == [True, False] and type(m["t.bools"][0]) is bool
        assert m["t.nested"] == [[1, 2], [3]]
        assert m["qwen2moe.block_count"] == 1
        t = f.metadata_types
        assert t["t.u16"] == "uint16" and t["t.str"] == "string" and t["t.strs"] == "array[string]"
        assert t["t.ints"] == "array[int32]" and t["t.nested"] == "array[array[int32]]"


def test_tensor_table_and_zero_copy_bytes(small: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, written = small
    with open_gguf(path) as f:
        assert list(f.tensors) == list(written)
        emb = f.tensor("token_embd.weight")
        assert (emb.ggml_type, emb.shape, emb.nbytes) == ("F32", (16, 8), 16 * 8 * 4)
        gate = f.tensors["blk.0.ffn_gate_exps.weight"]
        assert (gate.ggml_type, gate.shape, gate.nbytes) == ("F16", (4, 6, 8), 4 * 6 * 8 * 2)
        down = f.tensors["blk.0.ffn_down_exps.weight"]
        assert (down.ggml_type, down.shape, down.nbytes) == ("Q8_0", (3, 64), 3 * 68)
        assert f.tensors["blk.0.attn_norm.weight"].shape == (8,)
        for name, array in written.items():
            data = f.tensors[name].data
            assert data.dtype == np.uint8 and data.ndim == 1
            assert data.tobytes() == array.tobytes()
            assert not data.flags.writeable and not data.flags.owndata
            assert np.shares_memory(data, f.tensors[name].data)  # both are views of one map
        assert emb.n_elements == 128
        with pytest.raises(KeyError, match="small.gguf"):
            f.tensor("nope")


def test_agrees_with_gguf_py_reader(small: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = small
    reference = gguf.GGUFReader(path)
    with open_gguf(path) as f:
        for t in reference.tensors:
            ours = f.tensors[t.name]
            assert ours.offset == t.data_offset
            assert ours.nbytes == t.n_bytes
            assert ours.ggml_type == t.tensor_type.name
            assert ours.shape == tuple(int(d) for d in reversed(t.shape))


def test_custom_alignment(tmp_path: Path) -> None:
    tensors = {"a": np.arange(3, dtype=np.float32), "b": np.arange(5, dtype=np.float32)}

    def kv(w: gguf.GGUFWriter) -> None:
        w.data_alignment = 256
        w.add_custom_alignment(256)

    with open_gguf(write_gguf(tmp_path / "aligned.gguf", tensors, kv=kv)) as f:
        for t in f:
            assert t.offset % 256 == 0
            assert t.data.tobytes() == tensors[t.name].tobytes()


def test_ggml_type_sizes() -> None:
    assert ggml_type_sizes("Q4_K") == (256, 144)
    assert ggml_type_sizes("F32") == (1, 4)
    with pytest.raises(KeyError):
        ggml_type_sizes("Q9_9")


# -- split files ---------------------------------------------------------------------


def write_split(folder: Path, stem: str, parts: list[dict[str, np.ndarray]], **overrides: int) -> list[Path]:
    """Write the parts of a split model as llama.cpp's gguf-split names and tags them."""
    count = overrides.get("count", len(parts))
    total = overrides.get("tensors", sum(len(p) for p in parts))
    paths = []
    for i, tensors in enumerate(parts):

        def kv(w: gguf.GGUFWriter, i: int = i) -> None:
            w.add_uint16(SPLIT.LLM_KV_SPLIT_NO, overrides.get(f"no{i}", i))
            w.add_uint16(SPLIT.LLM_KV_SPLIT_COUNT, count)
            w.add_int32(SPLIT.LLM_KV_SPLIT_TENSORS_COUNT, total)
            if i == 0:
                w.add_string("general.name", "split model")

        path = folder / f"{stem}-{i + 1:05d}-of-{len(parts):05d}.gguf"
        paths.append(write_gguf(path, tensors, kv=kv))
    return paths


def _three_parts() -> list[dict[str, np.ndarray]]:
    return [
        {"a": np.full(4, 1, np.float32), "b": np.full(4, 2, np.float32)},
        {"c": np.full(4, 3, np.float32)},
        {"d": np.full((2, 3), 4, np.float16), "e": np.full(1, 5, np.float32)},
    ]


def test_split_parts_are_merged(tmp_path: Path) -> None:
    paths = write_split(tmp_path, "model", _three_parts())
    # Unrelated neighbours that must not be merged.
    write_gguf(tmp_path / "other.gguf", {"x": np.zeros(4, np.float32)})
    write_split(tmp_path, "model-q8", [{"y": np.zeros(4, np.float32)}, {"z": np.zeros(4, np.float32)}])
    write_gguf(tmp_path / "model-00001-of-00002.gguf", {"w": np.zeros(4, np.float32)})

    for given in (paths[0], paths[2]):
        with open_gguf(given) as f:
            assert f.paths == tuple(paths)
            assert f.path == paths[0]
            assert list(f.tensors) == ["a", "b", "c", "d", "e"]
            assert f.metadata["general.name"] == "split model"
            assert f.metadata[SPLIT.LLM_KV_SPLIT_COUNT] == 3
            assert f.tensors["c"].path == paths[1]
            assert f.tensors["d"].shape == (2, 3)
            assert f.tensors["d"].data.tobytes() == np.full((2, 3), 4, np.float16).tobytes()
            assert f.file_size == sum(p.stat().st_size for p in paths)
            assert "3 parts" in f.description


def test_split_missing_part_is_an_error(tmp_path: Path) -> None:
    paths = write_split(tmp_path, "model", _three_parts())
    paths[1].unlink()
    with pytest.raises(GGUFFormatError, match=r"model-00002-of-00003\.gguf") as e:
        open_gguf(paths[0])
    assert "missing" in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"count": 4}, "split.count"), ({"no1": 2}, "split.no"), ({"tensors": 7}, "split.tensors.count")],
)
def test_split_metadata_must_agree(tmp_path: Path, overrides: dict[str, int], message: str) -> None:
    paths = write_split(tmp_path, "model", _three_parts(), **overrides)
    with pytest.raises(GGUFFormatError, match=message):
        open_gguf(paths[0])


def test_split_duplicate_tensor_across_parts(tmp_path: Path) -> None:
    parts = _three_parts()
    parts[2]["a"] = np.zeros(4, np.float32)
    paths = write_split(tmp_path, "model", parts)
    with pytest.raises(GGUFFormatError, match="'a'"):
        open_gguf(paths[0])


def test_split_part_renamed_is_an_error(tmp_path: Path) -> None:
    paths = write_split(tmp_path, "model", _three_parts())
    renamed = paths[0].rename(tmp_path / "model.gguf")
    with pytest.raises(GGUFFormatError, match="NAME-00001-of-0000N"):
        open_gguf(renamed)


def test_split_written_by_gguf_py(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama", split_max_tensors=2)
    for i in range(5):
        writer.add_tensor(f"t{i}", np.full(3, i, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_gguf(tmp_path / "w-00002-of-00003.gguf") as f:
        assert len(f.paths) == 3
        assert [t.data.view(np.float32)[0] for t in f] == [0, 1, 2, 3, 4]
        assert f.architecture == "llama"


# -- malformed input -----------------------------------------------------------------


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _tensor_info_offset(path: Path, name: str) -> int:
    """Offset of the n_dims field that follows tensor `name`'s name in the tensor table."""
    raw = path.read_bytes()
    encoded = struct.pack("<Q", len(name)) + name.encode()
    return raw.index(encoded) + len(encoded)


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "plain.gguf", {"w.weight": np.arange(64, dtype=np.float32).reshape(8, 8)})


def test_wrong_magic(plain: Path) -> None:
    _patch(plain, 0, b"GGUX")
    with pytest.raises(GGUFFormatError, match=r"plain\.gguf.*not a GGUF file"):
        open_gguf(plain)


def test_lfs_pointer_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(GGUFFormatError, match="git lfs"):
        open_gguf(path)


@pytest.mark.parametrize(("version", "message"), [(1, "version 1"), (99, "version 99"), (3 << 24, "big-endian")])
def test_unsupported_versions(plain: Path, version: int, message: str) -> None:
    _patch(plain, 4, struct.pack("<I", version))
    with pytest.raises(GGUFFormatError, match=message):
        open_gguf(plain)


def test_truncated_file(plain: Path) -> None:
    raw = plain.read_bytes()
    plain.write_bytes(raw[:-16])
    with pytest.raises(GGUFFormatError, match=r"'w\.weight'.*past the end"):
        open_gguf(plain)
    plain.write_bytes(raw[:40])
    with pytest.raises(GGUFFormatError, match="truncated"):
        open_gguf(plain)
    plain.write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="too short"):
        open_gguf(plain)


def test_unknown_type_id(plain: Path) -> None:
    at = _tensor_info_offset(plain, "w.weight") + 4 + 2 * 8
    _patch(plain, at, struct.pack("<I", 250))
    with pytest.raises(GGUFFormatError, match=r"'w\.weight'.*unknown GGML type id 250"):
        open_gguf(plain)


def test_offset_beyond_file(plain: Path) -> None:
    at = _tensor_info_offset(plain, "w.weight") + 4 + 2 * 8 + 4
    _patch(plain, at, struct.pack("<Q", 1 << 40))
    with pytest.raises(GGUFFormatError, match="past the end"):
        open_gguf(plain)


def test_huge_dimension(plain: Path) -> None:
    at = _tensor_info_offset(plain, "w.weight") + 4
    _patch(plain, at, struct.pack("<Q", 1 << 62))
    with pytest.raises(GGUFFormatError, match="more than the whole file"):
        open_gguf(plain)


def test_too_many_dimensions(plain: Path) -> None:
    _patch(plain, _tensor_info_offset(plain, "w.weight"), struct.pack("<I", 9))
    with pytest.raises(GGUFFormatError, match="9 dimensions"):
        open_gguf(plain)


@pytest.mark.parametrize(("offset", "what"), [(8, "tensors"), (16, "metadata entries")])
def test_absurd_counts(plain: Path, offset: int, what: str) -> None:
    _patch(plain, offset, struct.pack("<Q", 2**63))
    with pytest.raises(GGUFFormatError, match=f"claims {2**63} {what}"):
        open_gguf(plain)


def test_absurd_string_length(plain: Path) -> None:
    _patch(plain, 24, struct.pack("<Q", 2**60))  # length of the first metadata key
    with pytest.raises(GGUFFormatError, match="truncated or corrupt"):
        open_gguf(plain)


def test_absurd_array_length(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "arr.gguf", {}, kv=lambda w: w.add_array("t.strs", ["a", "b"]))
    raw = path.read_bytes()
    at = raw.index(b"t.strs") + len(b"t.strs") + 4 + 4  # value type, element type, then count
    _patch(path, at, struct.pack("<Q", 2**61))
    with pytest.raises(GGUFFormatError, match="t.strs"):
        open_gguf(path)


def test_missing_paths_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(KtUserError, match="does not exist"):
        open_gguf(tmp_path / "nothing.gguf")
    with pytest.raises(KtUserError, match="is a directory"):
        open_gguf(tmp_path)


def test_close_with_live_views(plain: Path) -> None:
    f = open_gguf(plain)
    view = f.tensors["w.weight"].data
    f.close()  # must not raise although `view` still points into the map
    assert view.view(np.float32)[3] == 3
    assert isinstance(f.tensors["w.weight"], GGUFTensor)


# -- kt gguf inspect -----------------------------------------------------------------


def test_inspect_report(small: tuple[Path, dict[str, np.ndarray]]) -> None:
    from kt_core.weights.inspect import format_inspect, inspect_gguf

    path, written = small
    vocab = [f"tok{i}" for i in range(1000)]
    big = write_gguf(path.with_name("vocab.gguf"), written, raw_types={"blk.0.ffn_down_exps.weight": Q.Q8_0},
                     kv=lambda w: w.add_array("tokenizer.ggml.tokens", vocab))
    report = inspect_gguf(big)
    assert report["metadata"]["tokenizer.ggml.tokens"] == {"type": "array[string]", "length": 1000, "summarized": True}
    assert report["architecture"] == "qwen2moe" and report["version"] == 3
    assert report["tensor_count"] == 4
    assert report["types"]["F32"] == {"count": 2, "bytes": 16 * 8 * 4 + 8 * 4}
    assert report["types"]["Q8_0"] == {"count": 1, "bytes": 3 * 68}
    assert report["tensor_bytes"] == sum(t["bytes"] for t in report["tensors"])
    assert report["parameters"] == 16 * 8 + 8 + 4 * 6 * 8 + 3 * 64
    assert report["file_bytes"] == big.stat().st_size
    assert report["tensors"][2] == {"name": "blk.0.ffn_gate_exps.weight", "type": "F16", "shape": [4, 6, 8],
                                    "bytes": 4 * 6 * 8 * 2, "part": 1}
    text = format_inspect(report)
    assert "<array[string], 1000 items>" in text
    assert "tok999" not in text
    assert "blk.0.ffn_down_exps.weight  Q8_0  3×64" in text
    assert inspect_gguf(path)["metadata"]["t.str"] == "héllo\nworld"
    assert "héllo\\nworld" in format_inspect(inspect_gguf(path))


def test_inspect_split_model(tmp_path: Path) -> None:
    from kt_core.weights.inspect import format_inspect, inspect_gguf

    paths = write_split(tmp_path, "model", _three_parts())
    report = inspect_gguf(paths[1])
    assert report["parts"] == [str(p) for p in paths]
    assert [t["part"] for t in report["tensors"]] == [1, 1, 2, 3, 3]
    assert "split into 3 parts" in format_inspect(report)


def test_gguf_cli(small: tuple[Path, dict[str, np.ndarray]], capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from kt_core.cli.gguf_cmd import register

    parser = argparse.ArgumentParser(prog="kt")
    register(parser.add_subparsers(dest="command"))
    path, _ = small
    args = parser.parse_args(["gguf", "inspect", str(path), "--json"])
    assert args.handler(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensor_count"] == 4 and report["metadata"]["t.strs"] == ["a", "", "ü"]
    args = parser.parse_args(["gguf", "inspect", str(path)])
    assert args.handler(args) == 0
    assert "token_embd.weight" in capsys.readouterr().out
    _patch(path, 0, b"XXXX")
    with pytest.raises(GGUFFormatError):
        args.handler(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["gguf"])


def _damaged_variants(plain: Path) -> dict[str, Path]:
    """Copies of `plain` with each kind of damage the CLI must report cleanly."""
    raw = plain.read_bytes()
    type_at = _tensor_info_offset(plain, "w.weight") + 4 + 2 * 8
    patches = {
        "wrong-magic": (0, b"GGUX"),
        "unknown-type": (type_at, struct.pack("<I", 250)),
        "offset-beyond": (type_at + 4, struct.pack("<Q", 1 << 40)),
    }
    variants = {"truncated": raw[:-16], "cut-in-header": raw[:40], "empty": b""}
    for name, (at, data) in patches.items():
        damaged = bytearray(raw)
        damaged[at : at + len(data)] = data
        variants[name] = bytes(damaged)
    paths = {}
    for name, data in variants.items():
        paths[name] = plain.with_name(f"{name}.gguf")
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize("command", [["gguf", "inspect"], ["gguf", "inspect", "--json"], ["generate", "--model"]])
def test_cli_reports_damaged_files_with_exit_code_2(
    plain: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`kt` turns every GGUFFormatError into one 'kt: error:' line naming the file, exit 2."""
    from kt_core.cli.main import main

    extra = ["--rules", "qwen3-moe-cpu-torch", "--prompt", "x"] if command[0] == "generate" else []
    for kind, path in _damaged_variants(plain).items():
        args = [*command[:2], str(path), *command[2:], *extra]
        assert main(args) == 2, (kind, args)
        err = capsys.readouterr().err
        assert err.startswith("kt: error: ") and str(path) in err, (kind, err)
        assert "Traceback" not in err and err.count("\n") <= 2, (kind, err)
