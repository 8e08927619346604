"""`KMLPCPUInfer`: a gated MLP (shared experts, dense layers) as one engine job on the GGUF blocks.

``down(act(gate(x)) * up(x))`` is what a routed expert computes, so the engine's MoE layer
with a single expert and every token routed to it at weight 1 is exactly this MLP: gate
and up fused with the activation, the intermediate rows quantized, down — one job on the
pool instead of three linear calls with torch's activation and product between them.
That saves two engine round trips and their Python per call (a decode step of
DeepSeek-V2-Lite has 27 such MLPs), and runs the weights through the kernels tuned for
the experts. Replacing the MLP module as a whole (``recursive: False``) is what lets it
own its three weights; its ``gate_proj``/``up_proj``/``down_proj`` children are consumed,
never called.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.backends import BackendMemory
from kt_core.injected import BaseInjectedModule
from kt_core.weights.source import WeightSource
from kt_ops_cpuinfer import _engine
from kt_ops_cpuinfer.activation import activation_name
from kt_ops_cpuinfer.dtypes import engine_rows
from kt_ops_cpuinfer.isa import current_isa
from kt_ops_cpuinfer.moe_job import MoEJob
from kt_ops_cpuinfer.pool import get_pool, require_cpu, scratch_memory
from kt_ops_cpuinfer.weights import EngineMatrix, read_matrix, storage_problem

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class KMLPCPUInfer(BaseInjectedModule):
    """A gated MLP with ``gate_proj``, ``up_proj``, ``down_proj`` (no biases) by the C++ engine
    (devices: cpu); the activation is the config's ``hidden_act``, `threads` sizes the shared pool."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        threads: int | None = None,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, generate_device, prefill_device, **kwargs)
        require_cpu("KMLPCPUInfer", key, self.device)
        if orig_module is None or self.accepts(orig_module) is not None:
            raise TypeError(f"KMLPCPUInfer at {key}: {self.accepts(orig_module) if orig_module is not None else 'no module to replace'}")
        self.threads = threads
        self.compat_backend = backend
        self.act = activation_name(config)
        self.hidden_size = orig_module.gate_proj.in_features
        self.intermediate_size = orig_module.gate_proj.out_features
        self.isa: str | None = None
        self._layer: Any = None
        self._matrices: tuple[EngineMatrix, ...] = ()
        self._route: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._job = MoEJob("KMLPCPUInfer", key)
        self._submitted: torch.Tensor | None = None  # the input of the job in flight: the output's shape and dtype

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        children = [getattr(module, name, None) for name in _PROJECTIONS]
        if not all(isinstance(c, nn.Linear) for c in children):
            return (
                f"KMLPCPUInfer replaces a gated MLP with nn.Linear children {', '.join(_PROJECTIONS)} "
                f"(DeepseekV2MLP, Qwen2MoeMLP…), not {type(module).__name__}"
            )
        gate, up, down = children
        if any(c.bias is not None for c in children):
            return f"KMLPCPUInfer computes MLPs without biases; {type(module).__name__}'s projections have them"
        if (up.in_features, up.out_features) != (gate.in_features, gate.out_features) or (
            down.in_features,
            down.out_features,
        ) != (gate.out_features, gate.in_features):
            return f"{type(module).__name__}'s projections do not have the shapes of a gated MLP"
        return None

    def consumed_children(self) -> tuple[str, ...]:
        return _PROJECTIONS

    def _source(self) -> WeightSource:
        if self.gguf_loader is None:
            raise RuntimeError(f"KMLPCPUInfer at {self.key} was created without a weight source")
        return self.gguf_loader

    def check_weights(self) -> list[str]:
        source = self._source()
        names = [f"{self.key}.{p}.weight" for p in _PROJECTIONS]
        return [p for name in names if (p := storage_problem(source, name, "KMLPCPUInfer"))]

    def load(self) -> None:
        source = self._source()
        H, inter = self.hidden_size, self.intermediate_size
        shapes = {"gate_proj": (inter, H), "up_proj": (inter, H), "down_proj": (H, inter)}
        gate, up, down = (read_matrix(source, f"{self.key}.{p}.weight", shapes[p], "KMLPCPUInfer") for p in _PROJECTIONS)
        self.isa = current_isa()
        self._layer = _engine.MoELayer(get_pool(self.threads), self.isa, 1, H, inter, gate.spec(), up.spec(), down.spec(), self.act)
        self._matrices = (gate, up, down)

    def unload(self) -> None:
        if self._job.pending:
            self.sync()
        self._layer = None
        self._matrices = ()
        self._route.clear()

    def memory(self) -> BackendMemory:
        if self._layer is None:
            return BackendMemory()
        return BackendMemory(
            mapped=sum(m.mapped_bytes for m in self._matrices),
            repacked=sum(m.repacked_bytes for m in self._matrices),
            shared=scratch_memory(get_pool(self.threads)),
        )

    @property
    def weight_types(self) -> dict[str, str]:
        return {p: m.ggml_type for p, m in zip(_PROJECTIONS, self._matrices, strict=True)}

    def _routing(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token to expert 0 at weight 1, kept per token count (decode reuses one)."""
        route = self._route.get(tokens)
        if route is None:
            route = (torch.zeros(tokens, 1, dtype=torch.int64), torch.ones(tokens, 1, dtype=torch.float32))
            if len(self._route) < 8:
                self._route[tokens] = route
        return route

    def submit(self, x: torch.Tensor) -> None:
        """Queue the MLP of `x` [..., H] on the pool; returns before it is computed.

        What lets a MoE block start the shared experts before it routes (`sync` collects
        them): the engine computes while Python does the routing.
        """
        if self._layer is None:
            raise RuntimeError(f"KMLPCPUInfer at {self.key} used before load()")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"KMLPCPUInfer at {self.key}: input has {x.shape[-1]} features, expected {self.hidden_size}")
        rows = engine_rows(x, self.hidden_size)  # the model's dtype: the engine widens and rounds itself
        ids, weights = self._routing(rows.shape[0])
        self._job.start(self._layer, rows, ids, weights)
        self._submitted = x

    def sync(self) -> torch.Tensor:
        """Wait for the last `submit` and return the MLP's output in the input's shape, device and dtype."""
        out, x = self._job.wait(), self._submitted
        self._submitted = None
        return out.view(*x.shape).to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.submit(x)
        return self.sync()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, {self.hidden_size}->{self.intermediate_size}->{self.hidden_size}, "
            f"act={self.act}, isa={self.isa or 'not loaded'}"
        )
