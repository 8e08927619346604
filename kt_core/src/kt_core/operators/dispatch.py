"""Choosing between a decode backend and a prefill backend per forward call.

KTransformers switched backends by a global inference mode. kt decides per call from
the number of tokens in it: at or above ``prefill_threshold`` tokens the prefill
backend runs, below it the generate backend. A decode step (one token per sequence)
therefore always uses ``generate_op``, and a long prompt uses ``prefill_op`` — without
any global state. Both backends stay loaded (on their own devices) so switching costs
nothing per call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from kt_core.injected import BaseInjectedModule
from kt_core.registry import OperatorKind, Registry
from kt_core.weights.source import WeightSource


class DispatchingModule(BaseInjectedModule):
    """An injected module that owns a generate backend and (optionally) a prefill backend."""

    backend_kind: OperatorKind

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        *,
        generate_op: str,
        prefill_op: str | None = None,
        prefill_threshold: int = 32,
        registry: Registry | None = None,
        backend_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, generate_device, prefill_device)
        if registry is None:
            from kt_core.plugins import get_registry

            registry = get_registry()
        backend_kwargs = dict(backend_kwargs or {})
        self.prefill_threshold = prefill_threshold
        gen_spec = registry.resolve_operator(generate_op, kind=self.backend_kind)
        self.generate_op = gen_spec.name
        self.generate_backend = gen_spec.load_class()(
            key, gguf_loader, config, orig_module, device=self.generate_device,
            **{**kwargs, **backend_kwargs.get(gen_spec.name, {})},
        )
        self.prefill_backend = None
        self.prefill_op = None
        if prefill_op is not None:
            pre_spec = registry.resolve_operator(prefill_op, kind=self.backend_kind)
            same = pre_spec.name == gen_spec.name and self.prefill_device == self.generate_device
            if not same:
                self.prefill_op = pre_spec.name
                self.prefill_backend = pre_spec.load_class()(
                    key, gguf_loader, config, orig_module, device=self.prefill_device,
                    **{**kwargs, **backend_kwargs.get(pre_spec.name, {})},
                )

    def backend_for(self, num_tokens: int) -> nn.Module:
        """The backend that computes a call with `num_tokens` tokens."""
        if self.prefill_backend is not None and num_tokens >= self.prefill_threshold:
            return self.prefill_backend
        return self.generate_backend

    def check_weights(self) -> list[str]:
        problems = list(self.generate_backend.check_weights())
        if self.prefill_backend is not None:
            problems += self.prefill_backend.check_weights()
        return problems

    def load(self) -> None:
        self.generate_backend.load()
        if self.prefill_backend is not None:
            self.prefill_backend.load()

    def unload(self) -> None:
        self.generate_backend.unload()
        if self.prefill_backend is not None:
            self.prefill_backend.unload()

    def extra_repr(self) -> str:
        ops = f"generate_op={self.generate_op!r}"
        if self.prefill_op is not None:
            ops += f", prefill_op={self.prefill_op!r}, prefill_threshold={self.prefill_threshold}"
        return f"{super().extra_repr()}, {ops}"
