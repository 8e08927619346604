"""Qwen MoE blocks: routing in float32, routed experts overlapped with the shared expert.

transformers' blocks call router, shared expert and experts one after another. When the
``experts`` child is kt's `KTransformersExperts` (or anything with ``submit``/``sync``),
these blocks *start* the routed experts, compute the shared expert while they run (the
CPU engine works asynchronously), then wait for them: the overlap KTransformers got from
its ``KQwen2MoeSparseMoeBlock``. A shared expert that is asynchronous itself
(``KMLPCPUInfer``) is started even before routing (`kt_core.moe.overlap_experts`). With a
plain transformers experts module they simply call it. Children (``experts``, ``shared_expert``, ``shared_expert_gate``) are called as
modules, so rules may replace them; only the router weight is read here, because
routing is part of the block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.calling_thread import on_calling_thread
from kt_core.injected import BaseInjectedModule
from kt_core.moe import finish_experts, load_router, overlap_experts, start_experts
from kt_core.weights.source import WeightSource
from kt_models_qwen.routing import softmax_topk_route


class _QwenMoeBlock(BaseInjectedModule):
    """Routing and routed experts shared by the Qwen2 and Qwen3 blocks."""

    replaces: str
    """Name of the transformers class this block replaces (checked by `accepts`)."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, generate_device, prefill_device, **kwargs)
        self.num_experts = int(config.num_experts)
        self.top_k = int(config.num_experts_per_tok)
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.router_weight: torch.Tensor | None = None

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        if not any(base.__name__ == cls.replaces for base in type(module).__mro__):
            return f"{cls.__name__} replaces {cls.replaces} (the MoE block at '...mlp'), not {type(module).__name__}"
        return None

    def consumed_children(self) -> tuple[str, ...]:
        """The router's weight is read in `load` (float32); the ``gate`` child is never called."""
        return ("gate",)

    def load(self) -> None:
        self.router_weight = load_router(self, self.num_experts)["weight"]

    def unload(self) -> None:
        self.router_weight = None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and float32 weights [T, k] for tokens [T, H]."""
        if self.router_weight is None:
            raise RuntimeError(f"{type(self).__name__} at {self.key} used before load()")
        with on_calling_thread(tokens.shape[0] * self.router_weight.numel()):  # decode: one token's product is tiny
            return softmax_topk_route(tokens, self.router_weight, self.top_k, self.norm_topk_prob)


class KQwen2MoeSparseMoeBlock(_QwenMoeBlock):
    """Qwen2-MoE block: routed experts plus a sigmoid-gated shared expert, overlapped."""

    replaces = "Qwen2MoeSparseMoeBlock"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        tokens = hidden_states.view(-1, hidden_dim)
        routed, shared = overlap_experts(
            self.experts, self.shared_expert, tokens, tokens, lambda: self.route(tokens), match_tokens=True
        )
        assert shared is not None
        shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
        out = routed.to(device=tokens.device, dtype=tokens.dtype) + shared.to(tokens.device)
        return out.reshape(batch_size, sequence_length, hidden_dim)


class KQwen3MoeSparseMoeBlock(_QwenMoeBlock):
    """Qwen3-MoE block: routed experts only (Qwen3-MoE has no shared expert)."""

    replaces = "Qwen3MoeSparseMoeBlock"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        tokens = hidden_states.view(-1, hidden_dim)
        ids, weights = self.route(tokens)
        routed = finish_experts(self.experts, start_experts(self.experts, tokens, ids, weights, match_tokens=True))
        return routed.to(device=tokens.device, dtype=tokens.dtype).reshape(batch_size, sequence_length, hidden_dim)
