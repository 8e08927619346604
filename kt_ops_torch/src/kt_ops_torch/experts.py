"""`KExpertsTorch`: routed experts in PyTorch, tokens grouped by expert.

Instead of looping over every expert (or every token), the (token, expert) pairs of a
batch are sorted by expert once; each expert that received tokens then runs one
gate/up/down matmul over its contiguous slice, and results are scattered back with one
``index_add_``. Decode (one token, k experts) costs k small matmuls; prefill amortizes
each expert's weights over all of its tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from kt_core.backends import ExpertsBackend
from kt_core.cpu_matmul import matmul_weight
from kt_core.weights.source import WeightSource
from kt_ops_torch.dtypes import resolve_dtype


class KExpertsTorch(ExpertsBackend):
    """Stacked expert weights in `dtype`; the transformers-5 experts call signature.

    An expert given a prefill's many tokens on a CPU without dot products for a 16-bit
    `dtype` computes them in float32 (`kt_core.cpu_matmul.matmul_weight`).
    """

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.dtype_name = dtype
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate: torch.Tensor | None = None
        self.up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None

    def load(self) -> None:
        self.gate, self.up, self.down = self.load_expert_weights(dtype=resolve_dtype(self.dtype_name))
        self.loaded = True

    def unload(self) -> None:
        self.gate = self.up = self.down = None
        self.loaded = False

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.gate is None or self.up is None or self.down is None:
            raise RuntimeError(f"KExpertsTorch at {self.key} used before load()")
        compute = self.gate.dtype
        num_tokens, top_k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        valid = (flat_ids >= 0) & (flat_ids < self.num_experts)  # ids outside [0, E) are masked slots
        order = torch.argsort(torch.where(valid, flat_ids, self.num_experts), stable=True)
        counts = torch.bincount(flat_ids[valid], minlength=self.num_experts).tolist()
        token_of = order // top_k
        x = hidden_states.to(compute)[token_of]
        w = topk_weights.reshape(-1)[order].to(compute)

        out = torch.zeros(num_tokens, hidden_states.shape[-1], dtype=compute, device=hidden_states.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            gate, up, down = (matmul_weight(stacked[expert], count) for stacked in (self.gate, self.up, self.down))
            seg = x[start:end].to(gate.dtype)
            h = self.act_fn(seg @ gate.T) * (seg @ up.T)
            y = (h @ down.T).to(compute) * w[start:end, None]
            out.index_add_(0, token_of[start:end], y)
            start = end
        return out.to(hidden_states.dtype)
