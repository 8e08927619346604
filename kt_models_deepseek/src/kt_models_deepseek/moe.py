"""`KDeepseekV2MoE` / `KDeepseekV3MoE`: DeepSeek MoE blocks that overlap routed and shared experts.

They replace transformers' ``DeepseekV2Moe`` / ``DeepseekV3MoE``. Routing is computed
here (`routing`), from router weights read at load in float32, with the same math as
transformers' routers. When the routed experts are a kt experts operator (anything with
``submit``/``sync``, such as `KTransformersExperts`), they are *started* and the shared
experts run while they compute — on a CPU engine or another device that hides the
shared experts' time; shared experts that are asynchronous themselves (``KMLPCPUInfer``)
are started even before routing (`kt_core.moe.overlap_experts`). A plain transformers
experts module is simply called.

The ``experts`` and ``shared_experts`` children are the original's, called as modules,
so rules replace them independently (experts → KTransformersExperts, shared experts'
linears → KTransformersLinear).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from kt_core.calling_thread import on_calling_thread
from kt_core.injected import BaseInjectedModule
from kt_core.moe import load_router, overlap_experts
from kt_core.weights.source import WeightSource
from kt_models_deepseek.routing import route_sigmoid, route_softmax


class _DeepseekMoE(BaseInjectedModule, abc.ABC):
    """Shared forward of the DeepSeek MoE blocks; subclasses provide the routing."""

    replaces: type[nn.Module]
    router_buffers: tuple[str, ...] = ()
    """Router tensors besides ``weight`` read at load (``key.gate.<name>``)."""

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
        self.top_k = int(config.num_experts_per_tok)
        self.num_experts = int(config.n_routed_experts)
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.router: dict[str, torch.Tensor] = {}

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        if not isinstance(module, cls.replaces):
            return f"{cls.__name__} replaces {cls.replaces.__name__} blocks, not {type(module).__name__}"
        return None

    def load(self) -> None:
        """Read the router's weight (and bias) in float32 onto this operator's device."""
        self.router = load_router(self, self.num_experts, self.router_buffers)
        self._give_to_kept_gate()

    def consumed_children(self) -> tuple[str, ...]:
        """The ``gate`` (router) is read by `load`, never called: the runtime must not load it."""
        return ("gate",)

    def _give_to_kept_gate(self) -> None:
        """Let a kept, still-unloaded ``gate`` child share the router tensors instead of loading copies.

        The gate module is never called (routing happens here) and is listed in
        `consumed_children`, but it is still part of the model tree; sharing keeps the
        tree free of ``meta`` tensors without holding the router twice.
        """
        gate = self._modules.get("gate")
        if gate is None or isinstance(gate, BaseInjectedModule):
            return
        if getattr(gate, "weight", None) is not None and gate.weight.is_meta:
            gate.weight = nn.Parameter(self.router["weight"], requires_grad=False)
        for name in self.router_buffers:
            if name in gate._buffers and gate._buffers[name] is not None and gate._buffers[name].is_meta:
                gate._buffers[name] = self.router[name]

    def unload(self) -> None:
        self.router = {}

    @abc.abstractmethod
    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert weights [T, K] (float32) and ids [T, K] for tokens [T, H]."""

    def _router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.router:
            raise RuntimeError(f"{type(self).__name__} at {self.key} used before load()")
        weight = self.router["weight"]
        with on_calling_thread(hidden_states.shape[0] * weight.numel()):  # decode: one token's product is tiny
            return F.linear(hidden_states.to(torch.float32), weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out_device = hidden_states.device
        x = hidden_states.to(self.device)
        tokens = x.view(-1, x.shape[-1])

        def route() -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = self.route(tokens)
            return ids, weights

        routed, shared = overlap_experts(self.experts, self.shared_experts, tokens, x, route)
        assert shared is not None
        out = routed.to(x.device).view(x.shape) + shared
        return out.to(out_device)


class KDeepseekV2MoE(_DeepseekMoE):
    """DeepSeek-V2 MoE: softmax routing (greedy or group-limited), shared experts overlapped."""

    replaces = DeepseekV2Moe

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_softmax(
            self._router_logits(hidden_states),
            self.top_k,
            method=self.config.topk_method,
            n_group=self.config.n_group,
            topk_group=self.config.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
        )


class KDeepseekV3MoE(_DeepseekMoE):
    """DeepSeek-V3 MoE: sigmoid routing with score correction bias and group limits, shared experts overlapped."""

    replaces = DeepseekV3MoE
    router_buffers = ("e_score_correction_bias",)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_sigmoid(
            self._router_logits(hidden_states),
            self.top_k,
            correction_bias=self.router["e_score_correction_bias"],
            n_group=self.config.n_group,
            topk_group=self.config.topk_group,
            norm_topk_prob=bool(self.config.norm_topk_prob),
            routed_scaling_factor=self.routed_scaling_factor,
        )
