"""`KExpertsMarlin`: routed experts held as int4 on their device, tokens grouped by expert.

Each expert's gate and up projections are quantized as one ``[2I, H]`` int4 weight (one
kernel call yields both halves; quantizing rows together or apart gives the same values,
since groups run along K within a row) and its down projection as ``[H, I]``. The
forward sorts the (token, expert) pairs of a batch by expert once, runs each expert
that received tokens over its contiguous slice, and scatters back with one
``index_add_`` — the scheme of `KExpertsTorch`, so the two differ only in the weights'
format. Weights are read one projection at a time in float32 and quantized expert by
expert on the device, so loading never holds more than one float projection stack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from kt_core.backends import ExpertsBackend
from kt_core.weights.source import WeightSource
from kt_ops_marlin.device_paths import Int4Matmul, path_note, path_problem, prepare_quantized
from kt_ops_marlin.group_size import shape_problem, validate_group_size
from kt_ops_marlin.int4 import Int4Weight, quantize_int4
from kt_ops_marlin.linear import compute_dtype


class KExpertsMarlin(ExpertsBackend):
    """Per-expert int4 weights (gate+up fused, down); the transformers-5 experts call signature."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        group_size: int = 128,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.group_size = validate_group_size(group_size)
        self.dtype_name = dtype
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate_up: list[Int4Matmul] | None = None
        self.down: list[Int4Matmul] | None = None
        self.compute: torch.dtype | None = None

    @classmethod
    def compute_path(cls, device: torch.device | str) -> str:
        """How this backend computes on `device` (what explain shows beside it)."""
        return path_note(device)

    def check_weights(self) -> list[str]:
        problems = [
            shape_problem(f"{self.key}.gate_proj", self.hidden_size, self.group_size),
            shape_problem(f"{self.key}.up_proj", self.hidden_size, self.group_size),
            shape_problem(f"{self.key}.down_proj", self.intermediate_size, self.group_size),
        ]
        path = path_problem(self.device)
        problems.append(None if path is None else f"{self.key}: KExpertsMarlin on {self.device}: {path}")
        return [p for p in problems if p is not None]

    def _load_stack(self, name: str) -> torch.Tensor:
        """One stacked projection ``[E, N, K]`` in float32 on the device, shape-checked."""
        source = self._source()
        tensor = source.load(f"{self.key}.{name}", dtype=torch.float32, device=self.device)
        i, h = self.intermediate_size, self.hidden_size
        expected = {"gate_proj": (i, h), "up_proj": (i, h), "gate_up_proj": (2 * i, h), "down_proj": (h, i)}[name]
        if tuple(tensor.shape) != (self.num_experts, *expected):
            raise ValueError(
                f"{source.description}: {self.key}.{name} has shape {tuple(tensor.shape)}, "
                f"expected {(self.num_experts, *expected)}"
            )
        return tensor

    def _quantize_each(self, stack: torch.Tensor, dtype: torch.dtype) -> list[Int4Weight]:
        return [quantize_int4(stack[e], self.group_size, dtype) for e in range(stack.shape[0])]

    def _quantized_gate_up(self, dtype: torch.dtype) -> list[Int4Weight]:
        if not self._source().has(f"{self.key}.gate_proj"):  # a source with only the fused transformers tensor
            return self._quantize_each(self._load_stack("gate_up_proj"), dtype)
        gate = self._quantize_each(self._load_stack("gate_proj"), dtype)
        up = self._quantize_each(self._load_stack("up_proj"), dtype)
        return [
            Int4Weight(torch.cat([g.q, u.q]), torch.cat([g.scales, u.scales]), g.group_size)
            for g, u in zip(gate, up, strict=True)
        ]

    def load(self) -> None:
        problems = [p for p in self.check_weights() if p.startswith(f"{self.key}.")]
        if problems:
            raise ValueError("; ".join(problems))
        dtype = self.compute = compute_dtype(self.dtype_name)
        self.gate_up = [prepare_quantized(w, dtype, self.device) for w in self._quantized_gate_up(dtype)]
        self.down = [prepare_quantized(w, dtype, self.device) for w in self._quantize_each(self._load_stack("down_proj"), dtype)]
        self.loaded = True

    def unload(self) -> None:
        self.gate_up = self.down = self.compute = None
        self.loaded = False

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None or self.down is None or self.compute is None:
            raise RuntimeError(f"KExpertsMarlin at {self.key} used before load()")
        compute = self.compute
        num_tokens, top_k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        valid = (flat_ids >= 0) & (flat_ids < self.num_experts)  # ids outside [0, E) are masked slots
        order = torch.argsort(torch.where(valid, flat_ids, self.num_experts), stable=True)
        counts = torch.bincount(flat_ids[valid], minlength=self.num_experts).tolist()
        token_of = order // top_k
        x = hidden_states.to(compute)[token_of]
        w = topk_weights.reshape(-1)[order].to(compute)

        out = torch.zeros(num_tokens, hidden_states.shape[-1], dtype=compute, device=hidden_states.device)
        inter = self.intermediate_size
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            gate_up = self.gate_up[expert](x[start:end])
            h = self.act_fn(gate_up[:, :inter]) * gate_up[:, inter:]
            out.index_add_(0, token_of[start:end], self.down[expert](h) * w[start:end, None])
            start = end
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, group_size={self.group_size}, device={self.device}, "
            f"path={self.compute_path(self.device)!r}"
        )
