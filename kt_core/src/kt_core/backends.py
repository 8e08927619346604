"""Backend contracts: what a linear, experts or per-head linear implementation must provide.

Backends do the arithmetic; the dispatching wrappers (`KTransformersLinear`,
`KTransformersExperts`) own placement and choose a backend per call, and model operators
may hold backends of their own (MLA's absorbed per-head products). A backend is
created by its wrapper with ``(key, gguf_loader, config, orig_module, device, **kwargs)``
and must implement `load`, `unload` and `forward`. Keeping the contract this small is
what lets a third-party plugin add a backend without touching kt.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.absorbed_attention import AbsorbedAttentionParts, FusedAbsorbedAttention
from kt_core.weights.source import WeightSource


@dataclass(frozen=True)
class BackendMemory:
    """Host memory a backend holds outside torch parameters and buffers, in bytes.

    torch tensors are counted by walking the model; what a native backend holds is
    invisible to that walk, so `kt bench` asks each backend. `mapped` is file memory
    shared with the page cache (a GGUF's memory map, used in place), `repacked` memory
    the backend made at load because the stored layout could not be used as it is,
    `scratch` its own working buffers. `shared` is memory several backends use together
    (a native engine's pool of working buffers), as (name, bytes) pairs: every backend
    using it reports it, and a sum counts each name once.
    """

    mapped: int = 0
    repacked: int = 0
    scratch: int = 0
    shared: tuple[tuple[str, int], ...] = ()

    def __add__(self, other: BackendMemory) -> BackendMemory:
        shared = dict(self.shared)
        for name, size in other.shared:
            shared[name] = max(size, shared.get(name, 0))
        return BackendMemory(
            self.mapped + other.mapped, self.repacked + other.repacked, self.scratch + other.scratch,
            tuple(sorted(shared.items())),
        )


class _Backend(nn.Module, abc.ABC):
    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.key = key
        self.gguf_loader = gguf_loader
        self.config = config
        self.device = torch.device(device)
        self.loaded = False

    def _source(self) -> WeightSource:
        if self.gguf_loader is None:
            raise RuntimeError(f"{type(self).__name__} at {self.key} was created without a weight source")
        return self.gguf_loader

    def check_weights(self) -> list[str]:
        """Problems with the tensors `load` will read (e.g. a GGML type this backend cannot
        compute on), found from `source.info` alone, before anything is read."""
        return []

    @abc.abstractmethod
    def load(self) -> None:
        """Read weights from the source onto `self.device` (in the backend's own format)."""

    def memory(self) -> BackendMemory:
        """What this backend holds beyond its torch parameters and buffers (nothing by default)."""
        return BackendMemory()

    @abc.abstractmethod
    def unload(self) -> None:
        """Free the weights."""


class LinearBackend(_Backend):
    """``y = x @ W.T + b`` for a weight ``key.weight`` [out, in] and optional ``key.bias``."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        if not isinstance(orig_module, nn.Linear):
            raise TypeError(f"linear backend at {key} needs an nn.Linear to replace, got {type(orig_module).__name__}")
        self.in_features = orig_module.in_features
        self.out_features = orig_module.out_features
        self.has_bias = orig_module.bias is not None

    def load_weight(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight [out, in] and bias from the source, on this backend's device."""
        source = self._source()
        weight = source.load(f"{self.key}.weight", dtype=dtype, device=self.device)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{source.description}: {self.key}.weight has shape {tuple(weight.shape)}, "
                f"expected {(self.out_features, self.in_features)}"
            )
        bias = source.load(f"{self.key}.bias", dtype=dtype, device=self.device) if self.has_bias else None
        return weight, bias

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [..., in] on this backend's device → [..., out]."""


class ExpertsBackend(_Backend):
    """Routed experts: ``sum_k w_k · down_e(act(gate_e(x)) * up_e(x))`` over each token's top-k.

    Weights are stacked per layer: gate/up [E, I, H], down [E, H, I]. `submit`/`sync`
    let a caller start the experts and compute something else meanwhile (shared experts,
    attention on another device); backends that compute synchronously inherit the
    default, which does the work in `submit`.
    """

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.num_experts = int(getattr(orig_module, "num_experts", 0) or _config_experts(config))
        self.hidden_size = int(getattr(orig_module, "hidden_dim", config.hidden_size))
        self.intermediate_size = int(getattr(orig_module, "intermediate_dim", 0) or config.moe_intermediate_size)
        self._pending: torch.Tensor | None = None

    def load_expert_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked gate, up [E, I, H] and down [E, H, I] from the source, on this backend's device.

        Sources provide the split names (``key.gate_proj``…); a source that only has the
        fused transformers tensor ``key.gate_up_proj`` is split here.
        """
        source = self._source()
        if source.has(f"{self.key}.gate_proj"):
            gate = source.load(f"{self.key}.gate_proj", dtype=dtype, device=self.device)
            up = source.load(f"{self.key}.up_proj", dtype=dtype, device=self.device)
        else:
            gate_up = source.load(f"{self.key}.gate_up_proj", dtype=dtype, device=self.device)
            gate, up = gate_up.chunk(2, dim=1)
        down = source.load(f"{self.key}.down_proj", dtype=dtype, device=self.device)
        expected = {
            "gate_proj": (self.num_experts, self.intermediate_size, self.hidden_size),
            "up_proj": (self.num_experts, self.intermediate_size, self.hidden_size),
            "down_proj": (self.num_experts, self.hidden_size, self.intermediate_size),
        }
        for name, tensor in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"{source.description}: {self.key}.{name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                )
        return gate.contiguous(), up.contiguous(), down.contiguous()

    @abc.abstractmethod
    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """`hidden_states` [T, H], `topk_ids`/`topk_weights` [T, K] → [T, H]."""

    def submit(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Start computing; `sync` returns the result. Synchronous backends compute here."""
        self._pending = self.forward(hidden_states, topk_ids, topk_weights)

    def sync(self) -> torch.Tensor:
        """Wait for the last `submit` and return its result."""
        if self._pending is None:
            raise RuntimeError(f"{type(self).__name__}.sync() at {self.key} without a submit()")
        result, self._pending = self._pending, None
        return result


class HeadwiseLinearBackend(_Backend):
    """Per-head products ``y[..., h, :] = W[h] @ x[..., h, :]`` for a stacked weight [heads, out, in].

    What MLA's absorbed attention multiplies (each head's query into latent space, each
    head's latent context back out): a dozen-odd small matrices with one input row each
    per token, where one call over all heads beats a loop of linear layers. The weight is
    tensor `key` of the source when the source has it (a GGUF file storing the per-head
    halves, read as stored); otherwise `fallback(dtype)` builds it from other tensors (a
    fused ``kv_b_proj``, a safetensors checkpoint).
    """

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None,
        device: str = "cpu",
        *,
        heads: int,
        out_features: int,
        in_features: int,
        fallback: Callable[[torch.dtype | None], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.heads = heads
        self.out_features = out_features
        self.in_features = in_features
        self.fallback = fallback

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.heads, self.out_features, self.in_features)

    def stored(self) -> bool:
        """Whether the source holds the weight as its own tensor `key` (else `fallback` builds it)."""
        return self._source().has(self.key)

    def load_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [heads, out, in] on this backend's device, from the source or the fallback."""
        source = self._source()
        if self.stored():
            weight = source.load(self.key, dtype=dtype, device=self.device)
        elif self.fallback is not None:
            built = self.fallback(dtype)
            weight = built.to(device=self.device, dtype=dtype or built.dtype)
        else:
            raise ValueError(f"{source.description} has no tensor {self.key} and {type(self).__name__} was given no fallback")
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"{source.description}: {self.key} has shape {tuple(weight.shape)}, expected {self.shape}")
        return weight

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [..., heads, in] on this backend's device → [..., heads, out]."""

    def latent_attention(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        visible_keys: torch.Tensor,
        scale: float,
    ) -> torch.Tensor | None:
        """Optionally, the attention core of MLA's absorbed form on this backend, or None.

        For one sequence: `q_latent` [s, H, L] (this backend's output) and `q_pe` [s, H, R]
        float32, the cached `c_kv` [T, L] and `k_pe` [T, R] in the cache's dtype, query i
        seeing keys [0, `visible_keys`[i]) (int32 [s]); returns softmax(scale · (q_latent·c_kvᵀ
        + q_pe·k_peᵀ)) · c_kv as float32 [s, H, L]. A backend that computes its products
        next to the cache (the CPU engine) saves the torch ops between them; the default
        returns None and the caller uses torch.
        """
        return None

    def fused_absorbed_attention(self, parts: AbsorbedAttentionParts) -> FusedAbsorbedAttention | None:
        """Optionally, MLA's whole absorbed step (projections, norm, rotary, cache write, core,
        o_proj) over `parts` as one call, with this backend as W_UK; None (the default) when
        this backend cannot compute some part, and the attention then calls them one by one."""
        return None


def _config_experts(config: PretrainedConfig) -> int:
    for attr in ("n_routed_experts", "num_experts", "num_local_experts"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    raise ValueError(f"cannot tell the number of experts from {type(config).__name__}")
