"""kt-core's helpers for model plugins, checked without any plugin installed.

The model plugins' tests exercise these through real models; these pin what kt-core
itself promises (messages, fall-backs, call order), so a third-party model plugin can
rely on them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.errors import KtUserError
from kt_core.injected import BaseInjectedModule
from kt_core.moe import finish_experts, load_router, overlap_experts, runs_asynchronously, start_experts
from kt_core.transfer import check_transfer_map
from kt_core.weights.gguf_metadata import ArchMetadata, rope_metadata, rope_parameters, token_ids
from kt_core.weights.name_map import embedding_and_head_mappings, stacked_expert_mappings


def test_missing_required_key_names_the_key_and_architecture():
    md = ArchMetadata({"llama.block_count": 2}, "llama")
    assert md.as_int("block_count") == 2 and md.get("expert_count", 7) == 7
    with pytest.raises(KtUserError, match=r"lacks the required key 'llama\.expert_count' \(architecture 'llama'\)"):
        md.as_float("expert_count")


def test_vocab_size_falls_back_to_the_tokenizer_and_token_ids_are_optional():
    assert ArchMetadata({"a.vocab_size": 9}, "a").vocab_size() == 9
    assert ArchMetadata({"tokenizer.ggml.tokens": ["x"] * 5}, "a").vocab_size() == 5
    with pytest.raises(KtUserError, match=r"neither 'a\.vocab_size' nor 'tokenizer\.ggml\.tokens'"):
        ArchMetadata({}, "a").vocab_size()
    assert token_ids({"tokenizer.ggml.padding_token_id": 3}) == {"pad_token_id": 3}


def test_rope_keys_round_trip_and_unknown_types_are_refused():
    config = PretrainedConfig(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})
    md = rope_metadata(config, "a")
    assert md == {"a.rope.freq_base": 500.0, "a.rope.scaling.type": "linear", "a.rope.scaling.factor": 2.0}
    assert rope_parameters(ArchMetadata(md, "a"), "A models") == config.rope_parameters
    with pytest.raises(KtUserError, match=r"'a\.rope\.scaling\.type' is 'odd'; A models use"):
        rope_parameters(ArchMetadata(md | {"a.rope.scaling.type": "odd"}, "a"), "A models")
    with pytest.raises(KtUserError, match="cannot be written to a a GGUF"):
        rope_metadata(PretrainedConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "a")


def test_transfer_map_is_normalized_and_layers_beyond_the_model_are_refused():
    assert check_transfer_map({"1": "cpu"}, 2, "M at model") == {1: "cpu"}
    assert check_transfer_map(None, 2, "M at model") == {}
    with pytest.raises(KtUserError, match=r"M at model: transfer_map names layer\(s\) \[2, 5\], but the model has 2"):
        check_transfer_map({5: "cpu", 2: "cpu", 1: "cpu"}, 2, "M at model")


def test_name_map_blocks_cover_the_expert_spellings_and_tied_heads():
    gate_up, gate, up, down = stacked_expert_mappings("m", "blk.0")
    parts = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    fused = gate_up.to_hf(parts)
    assert fused.shape == (2, 6, 4)
    assert all(torch.equal(a, b) for a, b in zip(gate_up.to_gguf(fused), parts, strict=True))
    assert [m.hf_name for m in (gate, up, down)] == ["m.experts.gate_proj", "m.experts.up_proj", "m.experts.down_proj"]
    tied = PretrainedConfig(tie_word_embeddings=True)
    assert [m.hf_name for m in embedding_and_head_mappings(tied, None)] == [
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]
    head = embedding_and_head_mappings(tied, frozenset({"token_embd.weight"}))[-1]
    assert head.hf_name == "lm_head.weight" and head.gguf_names == ("token_embd.weight",)


class _AsyncExperts(nn.Module):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def submit(self, tokens, ids, weights) -> None:
        self.log.append("submit")
        self.result = tokens * 2

    def sync(self) -> torch.Tensor:
        self.log.append("sync")
        return self.result


def test_asynchronous_experts_are_started_before_and_waited_for_after_the_other_work():
    log: list[str] = []
    experts = _AsyncExperts(log)
    tokens = torch.ones(3, 4)
    assert runs_asynchronously(experts)
    started = start_experts(experts, tokens, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    log.append("shared")
    assert started is None and torch.equal(finish_experts(experts, started), tokens * 2)
    assert log == ["submit", "shared", "sync"]


class _AsyncShared(nn.Module):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def submit(self, x) -> None:
        self.log.append("shared.submit")
        self.result = x + 1

    def sync(self):
        self.log.append("shared.sync")
        return self.result


class _PlainShared(nn.Module):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def forward(self, x):
        self.log.append("shared")
        return x + 1


def _route(log: list[str]):
    def route():
        log.append("route")
        return torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)

    return route


def test_overlap_starts_an_asynchronous_shared_mlp_before_routing():
    log: list[str] = []
    tokens = torch.ones(3, 4)
    routed, shared = overlap_experts(_AsyncExperts(log), _AsyncShared(log), tokens, tokens, _route(log))
    assert torch.equal(routed, tokens * 2) and torch.equal(shared, tokens + 1)
    assert log == ["shared.submit", "route", "submit", "shared.sync", "sync"]


def test_overlap_calls_a_synchronous_shared_mlp_while_the_routed_experts_run():
    log: list[str] = []
    tokens = torch.ones(3, 4)
    routed, shared = overlap_experts(_AsyncExperts(log), _PlainShared(log), tokens, tokens, _route(log))
    assert torch.equal(shared, tokens + 1) and log == ["route", "submit", "shared", "sync"]
    assert overlap_experts(_AsyncExperts(log), None, tokens, tokens, _route(log))[1] is None


def test_overlap_waits_for_a_submitted_shared_mlp_when_routing_fails():
    log: list[str] = []

    def failing_route():
        raise ValueError("bad router")

    tokens = torch.ones(3, 4)
    with pytest.raises(ValueError, match="bad router"):
        overlap_experts(_AsyncExperts(log), _AsyncShared(log), tokens, tokens, failing_route)
    assert log == ["shared.submit", "shared.sync"]


def test_plain_experts_are_called_at_once_with_matched_weights_on_request():
    seen = []

    class Plain(nn.Module):
        def forward(self, tokens, ids, weights):
            seen.append(weights.dtype)
            return tokens

    tokens = torch.ones(3, 4, dtype=torch.bfloat16)
    ids, weights = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    assert not runs_asynchronously(Plain())
    assert finish_experts(Plain(), start_experts(Plain(), tokens, ids, weights)) is tokens
    start_experts(Plain(), tokens, ids, weights, match_tokens=True)
    assert seen == [torch.float32, torch.bfloat16]


class _Source:
    description = "test.gguf"

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def load(self, name: str, dtype=None, device=None) -> torch.Tensor:
        return self.tensors[name].to(dtype=dtype, device=device)


def test_router_is_read_in_float32_and_its_shape_checked():
    config = PretrainedConfig(hidden_size=4)
    source = _Source({"mlp.gate.weight": torch.ones(3, 4, dtype=torch.bfloat16), "mlp.gate.bias": torch.zeros(3)})
    block = BaseInjectedModule("mlp", source, config)  # type: ignore[arg-type]
    router = load_router(block, 3, ("bias",))
    assert router["weight"].dtype == torch.float32 and set(router) == {"weight", "bias"}
    with pytest.raises(ValueError, match=r"test\.gguf: mlp\.gate\.weight has shape \(3, 4\), expected \(5, 4\)"):
        load_router(block, 5)
    with pytest.raises(RuntimeError, match="created without a weight source"):
        load_router(BaseInjectedModule("mlp", None, config), 3)
