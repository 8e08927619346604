"""The check of a weight source against the planned model, before any weight is read.

Everything wrong is listed in one error naming the checkpoint: missing tensors, shape
mismatches, and the unused tensors that usually explain them. Unused tensors alone are
a warning (real DeepSeek-V3 checkpoints carry a prediction layer transformers lacks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import meta_model, qwen3_moe_config, random_model

from kt_core.errors import KtUserError
from kt_core.runtime.load import check_source
from kt_core.weights.safetensors_source import SafetensorsSource

EXTRA = "model.layers.7.mlp.gate.weight"  # a layer beyond the model's three


def checkpoint(folder: Path, drop: tuple[str, ...] = (), reshape: tuple[str, ...] = (), extra: bool = False) -> Path:
    """Save a tiny Qwen3-MoE's weights with tensors dropped, reshaped or added."""
    tensors = {k: v.contiguous() for k, v in random_model(qwen3_moe_config()).state_dict().items() if k not in drop}
    for name in reshape:
        tensors[name] = torch.zeros(3)
    if extra:
        tensors[EXTRA] = torch.zeros(8, 64)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_a_matching_checkpoint_passes(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    assert check_source(meta_model(config), SafetensorsSource(checkpoint(tmp_path)), config) == []


def test_missing_mismatched_and_unexpected_are_listed_in_one_error(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    dropped = ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.gate.weight")
    source = SafetensorsSource(checkpoint(tmp_path, drop=dropped, reshape=("model.norm.weight",), extra=True))
    with pytest.raises(KtUserError) as raised:
        check_source(meta_model(config), source, config)
    message = str(raised.value)
    assert message.startswith(source.description) and str(tmp_path) in message
    assert f"missing tensors (2): {', '.join(sorted(dropped))}" in message
    assert "shape mismatches (1):\n    model.norm.weight: source has (3,), model expects (64,)" in message
    assert f"unexpected tensors, not used by the model (1): {EXTRA}" in message


def test_only_a_shape_mismatch_is_an_error_too(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    source = SafetensorsSource(checkpoint(tmp_path, reshape=("model.layers.0.input_layernorm.weight",)))
    with pytest.raises(KtUserError, match=r"shape mismatches \(1\)") as raised:
        check_source(meta_model(config), source, config)
    assert "missing" not in str(raised.value) and "unexpected" not in str(raised.value)


def test_unused_tensors_alone_are_a_warning(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    source = SafetensorsSource(checkpoint(tmp_path, extra=True))
    (warning,) = check_source(meta_model(config), source, config)
    assert warning.startswith(source.description) and EXTRA in warning and "1 tensors are not used" in warning
