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

import torch


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
