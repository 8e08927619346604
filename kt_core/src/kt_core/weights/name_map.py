"""How transformers parameter names correspond to tensors in a GGUF file.

A model plugin builds a `NameMap` for one model (it depends on the config: layer count,
dense-vs-MoE layers, which DeepSeek `kv_b` form the file uses). Each `TensorMapping`
says which GGUF tensors make up one transformers tensor and how to turn one into the
other in both directions, so the same table serves loading (GGUF → torch) and
`kt convert` (torch → GGUF).

Expert weights have two spellings on the transformers side: the stacked fused
``mlp.experts.gate_up_proj`` that the transformers 5 module holds, and the split stacked
``mlp.experts.gate_proj`` / ``up_proj`` / ``down_proj`` that kt's expert backends load
(and that GGUF stores as ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``). A
name map provides both; only identity mappings (`is_identity`) may be read raw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

VIRTUAL_EXPERT_NAMES = ("mlp.experts.gate_proj", "mlp.experts.up_proj")
"""Suffixes of the split stacked expert names `stacked_expert_mappings` adds beside the module's own parameters."""


def _single(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    (t,) = tensors
    return t


def _as_list(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


@dataclass(frozen=True)
class TensorMapping:
    """One transformers tensor ⇄ one or more GGUF tensors.

    `to_hf` receives the GGUF tensors (dequantized, in PyTorch shape order, in the order
    of `gguf_names`) and returns the transformers tensor; `to_gguf` is its inverse.
    Identity mappings leave both as they are.
    """

    hf_name: str
    gguf_names: tuple[str, ...]
    to_hf: Callable[[Sequence[torch.Tensor]], torch.Tensor] = _single
    to_gguf: Callable[[torch.Tensor], list[torch.Tensor]] = _as_list
    keep_f32: bool = False
    """llama.cpp keeps this tensor in F32 whatever the file type (norms, router, biases)."""

    @property
    def is_identity(self) -> bool:
        return len(self.gguf_names) == 1 and self.to_hf is _single and self.to_gguf is _as_list


@dataclass
class NameMap:
    """All mappings of one model, looked up by transformers name."""

    mappings: dict[str, TensorMapping] = field(default_factory=dict)

    def add(self, mapping: TensorMapping) -> None:
        self.mappings[mapping.hf_name] = mapping

    def get(self, hf_name: str) -> TensorMapping | None:
        return self.mappings.get(hf_name)

    def __contains__(self, hf_name: str) -> bool:
        return hf_name in self.mappings

    def __iter__(self) -> Iterator[TensorMapping]:
        return iter(self.mappings.values())

    def __len__(self) -> int:
        return len(self.mappings)


# -- building blocks shared by the model plugins' maps ---------------------------------
#
# llama.cpp names the tensors every decoder-only model has (embeddings, output head,
# gated feed-forwards, stacked experts) the same way in every architecture, so the model
# plugins build those parts of their maps from these helpers, and a fix to one (say, how
# tied embeddings are written) reaches every model.


def same_tensor(hf_name: str, gguf_name: str, *, keep_f32: bool = False) -> TensorMapping:
    """An identity mapping: the GGUF tensor is the transformers tensor, readable raw (`is_identity`)."""
    return TensorMapping(hf_name, (gguf_name,), keep_f32=keep_f32)


def output_head_mapping(config: PretrainedConfig, gguf_tensor_names: frozenset[str] | None) -> TensorMapping | None:
    """``lm_head`` ⇄ ``output.weight``, or ``token_embd.weight`` where the file has no output (as llama.cpp falls back).

    When writing (`gguf_tensor_names` None) a model with tied embeddings there is no
    mapping at all: the converter writes only ``token_embd``, and mapping ``lm_head``
    onto it too would write it twice.
    """
    if gguf_tensor_names is None:
        if getattr(config, "tie_word_embeddings", False):
            return None
        return same_tensor("lm_head.weight", "output.weight")
    if "output.weight" in gguf_tensor_names:
        return same_tensor("lm_head.weight", "output.weight")
    return same_tensor("lm_head.weight", "token_embd.weight")


def embedding_and_head_mappings(
    config: PretrainedConfig, gguf_tensor_names: frozenset[str] | None
) -> list[TensorMapping]:
    """The token embedding, the final norm (kept in F32) and the output head (see `output_head_mapping`)."""
    out = [
        same_tensor("model.embed_tokens.weight", "token_embd.weight"),
        same_tensor("model.norm.weight", "output_norm.weight", keep_f32=True),
    ]
    head = output_head_mapping(config, gguf_tensor_names)
    if head is not None:
        out.append(head)
    return out


def gated_mlp_mappings(hf_prefix: str, blk_prefix: str, gguf_suffix: str = "") -> list[TensorMapping]:
    """``<hf_prefix>.{gate,up,down}_proj.weight`` ⇄ ``<blk_prefix>.ffn_{gate,up,down}<gguf_suffix>.weight``.

    A dense feed-forward (no suffix) or a shared expert (suffix ``_shexp``).
    """
    return [
        same_tensor(f"{hf_prefix}.{p}_proj.weight", f"{blk_prefix}.ffn_{p}{gguf_suffix}.weight")
        for p in ("gate", "up", "down")
    ]


def stacked_expert_mappings(mlp_prefix: str, blk_prefix: str) -> list[TensorMapping]:
    """Routed experts ⇄ ``ffn_{gate,up,down}_exps``, in both transformers spellings (module docstring).

    The fused ``<mlp_prefix>.experts.gate_up_proj`` [E, 2I, H] (gate rows first) that the
    transformers module holds is built from, and split back into, the gate and up tensors;
    the split stacked names (`VIRTUAL_EXPERT_NAMES`) that kt's expert backends load map 1:1.
    """
    gate, up, down = (f"{blk_prefix}.ffn_{p}_exps.weight" for p in ("gate", "up", "down"))
    return [
        TensorMapping(f"{mlp_prefix}.experts.gate_up_proj", (gate, up), to_hf=fuse_gate_up, to_gguf=split_gate_up),
        same_tensor(f"{mlp_prefix}.experts.gate_proj", gate),
        same_tensor(f"{mlp_prefix}.experts.up_proj", up),
        same_tensor(f"{mlp_prefix}.experts.down_proj", down),
    ]


def fuse_gate_up(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stacked gate and up [E, I, H] → transformers' fused ``gate_up_proj`` [E, 2I, H]."""
    gate, up = parts
    return torch.cat([gate, up], dim=1)


def split_gate_up(gate_up: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of `fuse_gate_up` (contiguous halves, as a GGUF writer needs them)."""
    inter = gate_up.shape[1] // 2
    return [gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous()]
