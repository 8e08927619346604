"""What `--model`/`--gguf` resolve to: a GGUF alone is a whole model; a config given with
it takes precedence; a tensor of a type kt cannot decode stops the run before loading."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import pytest
from tiny_models import qwen3_moe_config, random_model

from kt_core.cli.main import main
from kt_core.demo.tokenizer import build_demo_tokenizer
from kt_core.errors import KtUserError
from kt_core.plugins import get_registry
from kt_core.runtime.model_source import open_model

PROMPT = "route every token"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen3-MoE checkpoint directory and its Q4_0 GGUF (rows of 64: Q4_0 blocks)."""
    folder = tmp_path_factory.mktemp("qwen3")
    tokenizer = build_demo_tokenizer()
    random_model(qwen3_moe_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = folder / "model.gguf"
    assert main(["convert", str(folder), str(out), "--type", "Q4_0"]) == 0
    return folder, out


def test_a_gguf_alone_gives_config_and_tokenizer(converted: tuple[Path, Path]) -> None:
    folder, out = converted
    inputs = open_model(str(out), None, get_registry())
    expected = qwen3_moe_config(vocab_size=len(build_demo_tokenizer()))
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "head_dim"):
        assert getattr(inputs.config, key) == getattr(expected, key), key
    assert inputs.tokenizer is not None
    assert inputs.tokenizer.encode(PROMPT) == build_demo_tokenizer().encode(PROMPT)


def test_a_config_directory_given_with_the_gguf_takes_precedence(converted: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = converted
    config = qwen3_moe_config(vocab_size=len(build_demo_tokenizer()), rms_norm_eps=1e-3, rope_theta=1234.0)
    config.save_pretrained(tmp_path)  # config only: no weights, no tokenizer in this directory
    inputs = open_model(str(tmp_path), str(out), get_registry())
    assert inputs.config.rms_norm_eps == 1e-3
    assert inputs.config.rope_parameters["rope_theta"] == 1234.0
    assert inputs.source.description.startswith(str(out))  # weights still come from the GGUF
    assert inputs.tokenizer is not None  # the directory has none: the GGUF's is used

    from_gguf = open_model(None, str(out), get_registry()).config
    assert from_gguf.rms_norm_eps != 1e-3


def _retype(path: Path, tensor: str, type_id: int) -> None:
    """Overwrite the GGML type id in `tensor`'s entry of the tensor table."""
    raw = bytearray(path.read_bytes())
    name = struct.pack("<Q", len(tensor)) + tensor.encode()
    at = raw.index(name) + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(raw))


def test_a_type_kt_cannot_decode_is_reported_before_loading(converted: tuple[Path, Path], tmp_path: Path) -> None:
    # NVFP4 blocks (64 values in 36 bytes) take exactly the bytes of Q4_0 (32 in 18), so
    # retyping a Q4_0 tensor keeps the file consistent but makes it undecodable for kt.
    _, out = converted
    damaged = tmp_path / "nvfp4.gguf"
    damaged.write_bytes(out.read_bytes())
    gguf_name = "blk.1.ffn_gate_exps.weight"  # rows of hidden_size 64
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}[gguf_name] == "Q4_0"
    _retype(damaged, gguf_name, int(gguf.GGMLQuantizationType.NVFP4))
    with pytest.raises(KtUserError) as raised:
        open_model(str(damaged), None, get_registry())
    message = str(raised.value)
    assert message.startswith(f"{damaged}: 1 GGUF tensor(s) use GGML type(s) NVFP4, which no installed operator")
    # Named once, with every transformers name the plan could read it as.
    assert (f"{gguf_name} (NVFP4; read as model.layers.1.mlp.experts.gate_up_proj, "
            "model.layers.1.mlp.experts.gate_proj)") in message
    assert "supported: BF16, F16, F32" in message and "Q4_K" in message  # the types that would work


def _split_with_gguf_py(whole: Path, folder: Path, tensors_per_part: int) -> list[Path]:
    """Rewrite `whole` as llama.cpp-style parts with gguf-py's own splitting writer."""
    reader = gguf.GGUFReader(whole)
    writer = gguf.GGUFWriter(str(folder / "model.gguf"), reader.fields["general.architecture"].contents(),
                             split_max_tensors=tensors_per_part)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type)
    for tensor in reader.tensors:
        # `data` is already shaped as gguf-py wants: rows of elements, or of block bytes.
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(folder.glob("model-*-of-*.gguf"))


def test_a_split_gguf_runs_as_one_model_from_its_first_part(
    converted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, whole = converted
    parts = _split_with_gguf_py(whole, tmp_path, tensors_per_part=8)
    assert len(parts) >= 3 and parts[0].name.endswith(f"-00001-of-{len(parts):05d}.gguf")
    (tmp_path / "unrelated.gguf").write_bytes(whole.read_bytes())  # never merged in

    def tokens(model: Path) -> list[int]:
        capsys.readouterr()
        assert main(["generate", "--model", str(model), "--rules", "qwen3-moe-cpu-torch", "--prompt", PROMPT,
                     "--max-new-tokens", "8", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    assert tokens(parts[0]) == tokens(whole)
    source = open_model(str(parts[0]), None, get_registry()).source
    assert sorted(source.names()) == sorted(open_model(str(whole), None, get_registry()).source.names())
