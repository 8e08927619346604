"""`KDeepseekV2Attention`: absorbed multi-head latent attention for DeepSeek-V2/V3.

It replaces transformers' ``DeepseekV2Attention`` / ``DeepseekV3Attention`` and keeps
their contract: the same forward arguments, the same ``(output, weights)`` return (the
weights are None), and the same cache contents — the compressed latent ``c_kv`` and the
rotated ``k_pe``, one "head" each — so a cache filled by one can be read by the other.

What changes is the arithmetic: transformers expands every cached latent into per-head
keys and values on every call; here ``kv_b_proj`` is split once at load into its key
and value halves and absorbed into the query and the output (`mla_math`), so decode
reads only the latents. Calls with many query tokens (prefill) may use the expanded
form instead, which is cheaper there.

The projections before and after (``q_a_proj``, ``kv_a_proj_with_mqa``, ``o_proj``…) are
the original's children, called as modules, so rules may replace them (for example
with quantized linear operators). Only ``kv_b_proj``'s weight is read directly. The
absorbed per-head products themselves run on torch's matmuls over float copies of its
halves, or on a registered per-head backend named by `absorb_op` (the CPU engine's
``KHeadwiseLinearCPUInfer`` computes them on the file's quantized ``attn_k_b``/``attn_v_b``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import StaticLayer
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from kt_core.absorbed_attention import AbsorbedAttentionParts, FusedAbsorbedAttention, RopeForm
from kt_core.backends import HeadwiseLinearBackend
from kt_core.cpu_matmul import cpu_matmul_dtype
from kt_core.errors import KtUserError
from kt_core.injected import BaseInjectedModule
from kt_core.operators.dispatch import DispatchingModule
from kt_core.registry import OperatorKind, Registry, UnknownNameError
from kt_core.weights.source import WeightSource
from kt_models_deepseek.kwargs import DEFAULT_MLA_PREFILL_THRESHOLD
from kt_models_deepseek.mla_math import (
    HeadProjection,
    absorbed_attention,
    expanded_attention,
    matmul_projection,
    mla_softmax_scale,
    split_kv_b,
)
from kt_models_deepseek.mla_rotary import PositionEmbeddings, apply_mla_rotary
from kt_models_deepseek.visibility import (
    PrefixCountsMemo,
    key_visibility,
    query_positions,
    visible_prefix_lengths,
)

# The positional order of the replaced forward's arguments after hidden_states.
_V2_ARGS = ("attention_mask", "cache", "position_embeddings")
_V3_ARGS = ("position_embeddings", "attention_mask", "cache")

# One forward's prefix counts, shared by all its layers (see PrefixCountsMemo).
_PREFIX_COUNTS = PrefixCountsMemo()


class KDeepseekV2Attention(BaseInjectedModule):
    """MLA with ``kv_b_proj`` absorbed; replaces DeepseekV2Attention and DeepseekV3Attention."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        absorb_for_prefill: bool = False,
        prefill_threshold: int = DEFAULT_MLA_PREFILL_THRESHOLD,
        dtype: str | None = None,
        absorb_op: str | None = None,
        registry: Registry | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(key, gguf_loader, config, orig_module, generate_device, prefill_device, **kwargs)
        if orig_module is None:
            raise TypeError(f"KDeepseekV2Attention at {key} needs the attention module it replaces")
        self.absorb_for_prefill = absorb_for_prefill
        self.prefill_threshold = prefill_threshold
        self.dtype_name = dtype
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = mla_softmax_scale(config)
        self.rope_interleave = bool(getattr(config, "rope_interleave", False))
        self._arg_order = _V3_ARGS if isinstance(orig_module, DeepseekV3Attention) else _V2_ARGS
        self.w_uk: torch.Tensor | None = None
        self.w_uv: torch.Tensor | None = None
        self.absorb_op = absorb_op
        self.absorb_uk: HeadwiseLinearBackend | None = None
        self.absorb_uv: HeadwiseLinearBackend | None = None
        if absorb_op is not None:
            self.absorb_uk, self.absorb_uv = self._headwise_backends(absorb_op, registry)
        # The fused steps the per-head backend built, by the backends computing the call.
        self._fused: dict[tuple[Any, ...], FusedAbsorbedAttention | None] = {}

    def _headwise_backends(
        self, absorb_op: str, registry: Registry | None
    ) -> tuple[HeadwiseLinearBackend, HeadwiseLinearBackend]:
        """The backends of the two absorbed products: q_nope → latent (W_UK) and latent → v (W_UV)."""
        if registry is None:
            from kt_core.plugins import get_registry

            registry = get_registry()
        try:
            spec = registry.resolve_operator(absorb_op, kind=OperatorKind.HEADWISE_BACKEND)
        except UnknownNameError as exc:
            raise KtUserError(f"KDeepseekV2Attention at {self.key}: absorb_op: {exc}") from None
        cls = spec.load_class()
        heads, nope, v_dim, rank = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        halves = f"{self.key}.kv_b_proj"
        # The stored halves as llama.cpp writes them: k_b [H, kv_lora, nope] (W_UK per head,
        # transposed) and v_b [H, v, kv_lora]; without them, both are cut from kv_b_proj.
        uk = cls(f"{halves}.k_b", self.gguf_loader, self.config, None, device=self.generate_device,
                 heads=heads, out_features=rank, in_features=nope,
                 fallback=lambda dtype: self._kv_b_halves(dtype)[0].transpose(1, 2))
        uv = cls(f"{halves}.v_b", self.gguf_loader, self.config, None, device=self.generate_device,
                 heads=heads, out_features=v_dim, in_features=rank,
                 fallback=lambda dtype: self._kv_b_halves(dtype)[1])
        return uk, uv

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        if not isinstance(module, (DeepseekV2Attention, DeepseekV3Attention)):
            return (
                "KDeepseekV2Attention replaces DeepseekV2Attention or DeepseekV3Attention (MLA), "
                f"not {type(module).__name__}; match '...self_attn' of a DeepSeek model"
            )
        return None

    # -- weights ------------------------------------------------------------------------

    def load(self) -> None:
        """Load the absorbed products' weights: the per-head backends, and/or kv_b_proj's halves.

        The float halves (views of one ``kv_b_proj.weight``, no copy) serve the torch
        matmul path and the expanded form; with a per-head backend and `absorb_for_prefill`
        neither runs, so they are not read at all.
        """
        if self.gguf_loader is None:
            raise RuntimeError(f"KDeepseekV2Attention at {self.key} was created without a weight source")
        if self.absorb_uk is None or not self.absorb_for_prefill:
            weight = self._read_kv_b(self._absorbed_dtype())
            self.w_uk, self.w_uv = split_kv_b(weight, self.num_heads, self.qk_nope_head_dim, self.v_head_dim)
            self._give_to_kept_kv_b(weight)
        if self.absorb_uk is not None and self.absorb_uv is not None:
            self.absorb_uk.load()
            self.absorb_uv.load()
        self._fused.clear()

    def check_weights(self) -> list[str]:
        if self.absorb_uk is None or self.absorb_uv is None:
            return []
        return self.absorb_uk.check_weights() + self.absorb_uv.check_weights()

    def _kv_b_halves(self, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj.weight`` read and split into W_UK [H, nope, kv_lora] and W_UV [H, v, kv_lora] (views)."""
        weight = self._read_kv_b(dtype)
        return split_kv_b(weight, self.num_heads, self.qk_nope_head_dim, self.v_head_dim)

    def _read_kv_b(self, dtype: torch.dtype | None) -> torch.Tensor:
        assert self.gguf_loader is not None
        name = f"{self.key}.kv_b_proj.weight"
        weight = self.gguf_loader.load(name, dtype=dtype, device=self.device)
        expected = (self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"{self.gguf_loader.description}: {name} has shape {tuple(weight.shape)}, expected {expected}"
            )
        return weight

    def consumed_children(self) -> tuple[str, ...]:
        """``kv_b_proj`` is read by `load` and absorbed, never called: the runtime must not load it."""
        return ("kv_b_proj",)

    def _give_to_kept_kv_b(self, weight: torch.Tensor) -> None:
        """Let a kept, still-unloaded ``kv_b_proj`` child share our tensor instead of loading a copy.

        The child is never called (its halves are absorbed) and is listed in
        `consumed_children`, but it is still part of the model tree; sharing keeps the
        tree free of ``meta`` tensors without holding the weight twice.
        """
        child = self._modules.get("kv_b_proj")
        if isinstance(child, nn.Linear) and child.weight.is_meta:
            child.weight = nn.Parameter(weight, requires_grad=False)

    def _absorbed_dtype(self) -> torch.dtype:
        """The `dtype` kwarg; without it: on the CPU float32, or with a per-head backend
        (`absorb_op`) the model's dtype where the CPU multiplies it natively; elsewhere
        torch's default dtype.

        Why float32 on the CPU: decode's absorbed products are batched matmuls with one
        query row per head ([H, 1, nope] x [H, nope, kv_lora], then [H, 1, T] x [T, kv_lora]),
        which torch runs on a generic bfloat16 path about 10x slower than its float32 one
        (1.8 ms against 0.19 ms per layer for DeepSeek-V2-Lite's W_UK product on this
        project's 2-core machines) — more than the MoE layer's experts take. With a per-head
        backend the halves serve only the expanded form of long prefills. Its large matmuls
        are fast in bfloat16 where the CPU has AMX-BF16, at half float32's memory; without
        bfloat16 dot products they are ~13x slower than in float32 (103 against 8 ms per
        layer for a 128-token DeepSeek-V2-Lite prefill on the AVX2 machine), and with
        AVX512-BF16 alone 1.5-2x slower, so the halves are kept in float32 there
        (`cpu_matmul_dtype`).
        """
        if self.dtype_name is not None:
            return getattr(torch, self.dtype_name)
        if self.device.type != "cpu":
            return torch.get_default_dtype()
        if self.absorb_op is None:
            return torch.float32
        return cpu_matmul_dtype(torch.get_default_dtype())

    def unload(self) -> None:
        self.w_uk = self.w_uv = None
        self._fused.clear()
        for backend in (self.absorb_uk, self.absorb_uv):
            if backend is not None:
                backend.unload()

    # -- forward ------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """The replaced module's forward: V2 order (mask, cache, position_embeddings) or V3 order."""
        if len(args) > len(self._arg_order):
            raise TypeError(
                f"{type(self).__name__}.forward takes at most {len(self._arg_order) + 1} positional arguments"
            )
        for name, value in zip(self._arg_order, args, strict=False):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward got multiple values for {name!r}")
            kwargs[name] = value
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")  # transformers' deprecated name
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise ValueError(
                f"{type(self).__name__} at {self.key} needs position_embeddings (computed by the model's rotary_emb)"
            )
        output = self._attend(
            hidden_states, position_embeddings, kwargs.get("attention_mask"), cache, kwargs.get("position_ids")
        )
        return output, None

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _use_absorbed(self, num_queries: int) -> bool:
        return self.absorb_for_prefill or num_queries < self.prefill_threshold

    def _attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: PositionEmbeddings,
        attention_mask: Any,
        cache: Any,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        out_device = hidden_states.device
        x = hidden_states.to(self.device)
        batch, seq_len, _ = x.shape
        if cache is not None and batch == 1 and self.absorb_uk is not None and self._use_absorbed(seq_len):
            fused = self._fused_attend(x[0], position_embeddings, attention_mask, cache, position_ids)
            if fused is not None:
                return fused.view(batch, seq_len, -1).to(out_device)

        q = self._queries(x).view(batch, seq_len, self.num_heads, -1).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(x)
        kv_nope, k_pe = torch.split(compressed, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(kv_nope).view(batch, 1, seq_len, self.kv_lora_rank)
        k_pe = k_pe.view(batch, 1, seq_len, self.qk_rope_head_dim)
        q_pe, k_pe = apply_mla_rotary(q_pe, k_pe, position_embeddings, interleave=self.rope_interleave)

        past = cache.get_seq_length(self.layer_idx) if (cache is not None and position_ids is None) else 0
        q_positions = query_positions(position_ids, batch, seq_len, past, x.device)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)
            # Slots after the last visible position are never attended: skip them.
            num_keys = min(int(q_positions.max()) + 1, c_kv.shape[-2])
            c_kv, k_pe = c_kv[:, :, :num_keys], k_pe[:, :, :num_keys]
            k_positions = torch.arange(num_keys, device=x.device).unsqueeze(0)
        else:
            k_positions = q_positions
        absorbed = self._use_absorbed(seq_len)
        if absorbed and self.absorb_uk is not None:
            prefix = None
            if cache is not None and not isinstance(attention_mask, torch.Tensor):
                # Keys are cache slots 0..num_keys-1 and a query at p sees slots <= p.
                prefix = torch.clamp(q_positions + 1, max=num_keys).to(torch.int32)
            context = self._backend_context(q_nope, q_pe, c_kv, k_pe, prefix, q_positions, k_positions, attention_mask)
            if context is not None:
                return self.o_proj(context.to(x.dtype)).to(out_device)
        visible = key_visibility(q_positions, k_positions, attention_mask)

        to_latent, from_latent = self._projections(absorbed)
        dtype = self._absorbed_dtype() if self.w_uk is None else self.w_uk.dtype
        attend = absorbed_attention if absorbed else expanded_attention
        context = attend(
            q_nope.to(dtype),
            q_pe.to(dtype),
            c_kv.to(device=x.device, dtype=dtype),
            k_pe.to(device=x.device, dtype=dtype),
            to_latent,
            from_latent,
            self.softmax_scale,
            visible,
        )
        context = context.to(x.dtype).transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.v_head_dim)
        return self.o_proj(context).to(out_device)

    def _fused_attend(
        self,
        x: torch.Tensor,
        position_embeddings: PositionEmbeddings,
        attention_mask: Any,
        cache: Any,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The absorbed step of one sequence's `x` [s, hidden] as one call of the per-head
        backend's fused step, or None to run it op by op.

        It writes the cache itself, so it needs a transformers `StaticLayer` that already
        holds its buffers (the first prefill allocates them) and keeps that layer's
        bookkeeping as `StaticLayer.update` would.
        """
        layer = _static_layer(cache, self.layer_idx, self.kv_lora_rank, self.qk_rope_head_dim)
        if layer is None:
            return None
        rotary, rope_form = _rotary_rows(position_embeddings, self.rope_interleave)
        if rotary is None:
            return None
        seq_len = x.shape[0]
        step = self._fused_step(seq_len, rope_form)
        if step is None:
            return None
        start, rows = int(layer.cumulative_length), layer.keys.shape[2]
        if position_ids is None:
            positions = list(range(start, start + seq_len))
        else:
            positions = position_ids.reshape(-1).tolist()
            if len(positions) != seq_len:
                return None
        # As the op-by-op form: keys are slots 0..num_keys-1, a query at p sees slots <= p.
        num_keys = min(max(positions) + 1, rows)
        if isinstance(attention_mask, torch.Tensor):
            visible = _PREFIX_COUNTS.counts(positions, num_keys, attention_mask, position_ids)
            if visible is None:
                return None
        else:
            visible = [min(p + 1, num_keys) for p in positions]
        out = step(x, rotary, layer.keys[0, 0], layer.values[0, 0], start, visible)
        if out is not None:
            layer.cumulative_length.add_(seq_len)
        return out

    def _fused_step(self, seq_len: int, rope_form: RopeForm) -> FusedAbsorbedAttention | None:
        """The per-head backend's fused step over the modules computing `seq_len`-token calls (memoized)."""
        assert self.absorb_uk is not None and self.absorb_uv is not None
        names = ("q_proj",) if self.q_lora_rank is None else ("q_a_proj", "q_a_layernorm", "q_b_proj")
        modules = {name: _computing(self._modules.get(name), seq_len) for name in names}
        for name in ("kv_a_proj_with_mqa", "kv_a_layernorm", "o_proj"):
            modules[name] = _computing(self._modules.get(name), seq_len)
        key = (rope_form, *(id(m) for m in modules.values()))
        if key not in self._fused:
            if any(m is None for m in modules.values()):
                self._fused[key] = None
            else:
                self._fused[key] = self.absorb_uk.fused_absorbed_attention(AbsorbedAttentionParts(
                    q_proj=modules.get("q_proj"), q_a_proj=modules.get("q_a_proj"),
                    q_a_layernorm=modules.get("q_a_layernorm"), q_b_proj=modules.get("q_b_proj"),
                    kv_a_proj=modules["kv_a_proj_with_mqa"], kv_a_layernorm=modules["kv_a_layernorm"],
                    o_proj=modules["o_proj"], value_heads=self.absorb_uv, heads=self.num_heads,
                    nope=self.qk_nope_head_dim, rope=self.qk_rope_head_dim, latent=self.kv_lora_rank,
                    v_dim=self.v_head_dim, rope_form=rope_form, scale=self.softmax_scale,
                ))
        return self._fused[key]

    def _backend_context(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        prefix: torch.Tensor | None,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
        attention_mask: Any,
    ) -> torch.Tensor | None:
        """The absorbed form with the attention core on the per-head backend, or None.

        Three backend calls per sequence — q_nope·W_UK, `latent_attention`, ·W_UVᵀ — on
        rows in the backends' own layout ([s, H, d], no transposes). None when the backend
        offers no attention core, or a query's visible keys are not a prefix (padding).
        """
        assert self.absorb_uk is not None and self.absorb_uv is not None
        if not (self.absorb_uk.loaded and self.absorb_uv.loaded):
            raise RuntimeError(f"KDeepseekV2Attention at {self.key} used before load()")
        if prefix is None:
            prefix = visible_prefix_lengths(key_visibility(q_positions, k_positions, attention_mask))
            if prefix is None:
                return None
        q_latent = self.absorb_uk(q_nope.transpose(1, 2))  # [b, s, H, kv_lora]
        q_pe_rows = q_pe.transpose(1, 2)  # [b, s, H, rope]
        contexts = []
        for b in range(q_latent.shape[0]):
            latent = self.absorb_uk.latent_attention(
                q_latent[b], q_pe_rows[b], c_kv[b, 0], k_pe[b, 0], prefix[b], self.softmax_scale
            )
            if latent is None:
                return None
            contexts.append(self.absorb_uv(latent))  # [s, H, v]
        context = torch.stack(contexts) if len(contexts) > 1 else contexts[0].unsqueeze(0)
        return context.reshape(context.shape[0], context.shape[1], self.num_heads * self.v_head_dim)

    def _projections(self, absorbed: bool) -> tuple[Any, Any]:
        """What the chosen form multiplies with: per-head backends or the float halves."""
        if absorbed and self.absorb_uk is not None and self.absorb_uv is not None:
            uk, uv = self.absorb_uk, self.absorb_uv
            if not (uk.loaded and uv.loaded):
                raise RuntimeError(f"KDeepseekV2Attention at {self.key} used before load()")
            return _heads_second(uk), _heads_second(uv)
        if self.w_uk is None or self.w_uv is None:
            raise RuntimeError(f"KDeepseekV2Attention at {self.key} used before load()")
        if absorbed:
            return matmul_projection(self.w_uk), matmul_projection(self.w_uv.transpose(-1, -2))
        return self.w_uk, self.w_uv

    def extra_repr(self) -> str:
        mode = "absorbed" if self.absorb_for_prefill else f"absorbed below {self.prefill_threshold} tokens"
        products = f", absorb_op={self.absorb_op}" if self.absorb_op is not None else ""
        return f"{super().extra_repr()}, {mode}{products}"


def _computing(module: nn.Module | None, num_tokens: int) -> nn.Module | None:
    """The module that computes a `num_tokens`-token call of `module` (a wrapper's chosen backend)."""
    if isinstance(module, DispatchingModule):
        return module.backend_for(num_tokens)
    return module


def _static_layer(cache: Any, index: int, latent: int, rope: int) -> StaticLayer | None:
    """Layer `index` of `cache` when it is an allocated one-sequence `StaticLayer` holding MLA's rows."""
    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= index < len(layers):
        return None
    layer = layers[index]
    if type(layer) is not StaticLayer or not layer.is_initialized:
        return None
    keys, values = layer.keys, layer.values
    if keys.shape[:2] != (1, 1) or values.shape[:2] != (1, 1) or keys.shape[-1] != latent or values.shape[-1] != rope:
        return None
    return layer


def _rotary_rows(
    position_embeddings: PositionEmbeddings, interleave: bool
) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None, RopeForm]:
    """One sequence's position embeddings and their form (see `mla_rotary`), or None when not batch 1."""
    if isinstance(position_embeddings, torch.Tensor):
        if not position_embeddings.is_complex() or position_embeddings.dim() != 3 or position_embeddings.shape[0] != 1:
            return None, "complex"
        return position_embeddings[0], "complex"
    cos, sin = position_embeddings
    if cos.dim() != 3 or cos.shape[0] != 1 or sin.shape != cos.shape:
        return None, "half"
    return (cos[0], sin[0]), "interleaved" if interleave else "half"


def _heads_second(backend: HeadwiseLinearBackend) -> HeadProjection:
    """A per-head backend (input [..., H, d]) as a projection on attention's [b, H, s, d]."""
    return lambda x: backend(x.transpose(1, 2)).transpose(1, 2)
