"""Checks shared by the model plugins' GGUF name-map and metadata tests.

Every model plugin maps its transformers tensors onto llama.cpp's GGUF tensors and its
config onto GGUF metadata; the tests of each plugin run the same round trips through a
tiny random model. The helpers here take the plugin's `name_map`, `config_from_gguf` and
`gguf_metadata` as arguments, so each plugin's test file states only what is particular
to its models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from kt_core.weights.name_map import NameMap

NameMapFn = Callable[[PretrainedConfig, frozenset[str] | None], NameMap]


def to_gguf(nm: NameMap, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GGUF tensors `nm` writes for a state dict; each GGUF name written once."""
    out: dict[str, torch.Tensor] = {}
    for mapping in nm:
        if mapping.hf_name not in state:
            continue
        parts = mapping.to_gguf(state[mapping.hf_name])
        assert len(parts) == len(mapping.gguf_names)
        for name, tensor in zip(mapping.gguf_names, parts, strict=True):
            assert name not in out, f"{name} written twice"
            out[name] = tensor
    return out


def to_hf(nm: NameMap, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers tensors `nm` reads from GGUF tensors (those whose sources are all there)."""
    return {
        m.hf_name: m.to_hf([tensors[g] for g in m.gguf_names]) for m in nm if all(g in tensors for g in m.gguf_names)
    }


def assert_round_trips_exactly(
    name_map: NameMapFn, config: PretrainedConfig, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`to_gguf` then `to_hf` gives back every tensor of `state` bit for bit; the GGUF tensors and the read-back."""
    tensors = to_gguf(name_map(config, None), state)
    back = to_hf(name_map(config, frozenset(tensors)), tensors)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    return tensors, back


def assert_keep_f32_marks_what_llama_cpp_keeps_in_f32(
    nm: NameMap, state: dict[str, torch.Tensor], router_marker: str
) -> None:
    """1-D tensors, norms and routers (GGUF names containing `router_marker`) are exactly the F32 ones."""
    tensors = to_gguf(nm, state)
    for mapping in nm:
        gguf = mapping.gguf_names[0]
        f32 = tensors[gguf].dim() == 1 or "norm" in gguf or router_marker in gguf
        assert mapping.keep_f32 == f32, gguf


def shipped_configs(plugin_module: Any) -> list[Path]:
    """The config JSON files a plugin ships beside `plugin_module` (in ``configs/``)."""
    return sorted((Path(plugin_module.__file__).parent / "configs").glob("*.json"))


def config_from_json(path: Path) -> PretrainedConfig:
    """A shipped config file as the transformers config class its ``model_type`` names."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return type(AutoConfig.for_model(data["model_type"])).from_dict(data)


def assert_rebuilt_model_computes_the_same_logits(
    name_map: NameMapFn,
    config_from_gguf: Callable[[Mapping[str, Any]], PretrainedConfig],
    gguf_metadata: Callable[[PretrainedConfig], dict[str, Any]],
    config: PretrainedConfig,
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
) -> None:
    """A model built from the GGUF metadata and loaded from the GGUF tensors computes `model`'s logits."""
    tensors = to_gguf(name_map(config, None), state)
    rebuilt_config = config_from_gguf(gguf_metadata(config))
    rebuilt = type(model)(rebuilt_config).eval()
    loaded = to_hf(name_map(rebuilt_config, frozenset(tensors)), tensors)
    rebuilt.load_state_dict({k: loaded[k] for k in rebuilt.state_dict()}, strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def assert_tied_embeddings_write_no_output_and_read_token_embd(name_map: NameMapFn, config: PretrainedConfig) -> None:
    """Writing a tied model maps no ``lm_head`` (no ``output.weight``); reading it back uses ``token_embd``."""
    assert "lm_head.weight" not in name_map(config, None)
    names = frozenset(g for mapping in name_map(config, None) for g in mapping.gguf_names)
    assert "output.weight" not in names
    assert name_map(config, names).get("lm_head.weight").gguf_names == ("token_embd.weight",)
