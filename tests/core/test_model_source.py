"""What `--model`/`--gguf` resolve to: a GGUF alone is a whole model; a config given with
it takes precedence; a tensor of a type kt cannot decode stops the run before loading."""

from __future__ import annotations

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
