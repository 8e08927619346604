"""Pieces every model plugin's MoE block operator shares: the router weight and expert overlap.

A kt MoE block computes routing itself (from the router's weight, read in float32 so
that top-k picks the same experts as transformers' float32 router does) and calls its
``experts`` child. When that child is a kt experts operator — anything with the
``submit``/``sync`` pair of `kt_core.backends.ExpertsBackend`, such as
`KTransformersExperts` — the block *starts* the routed experts, computes the shared
experts while they run (on a CPU engine or another device that hides the shared
experts' time), then waits for them. A plain transformers experts module is simply
called. The model plugins differ in routing and in what runs meanwhile; these helpers
are the parts that must behave the same in all of them.

The order of a block's work is `overlap_experts`: a shared MLP that itself runs
asynchronously (``submit(x)``/``sync()``, such as ``KMLPCPUInfer``) is started before
routing, so the engine computes it while Python routes — on a CPU-only decode step the
routing's dozen small torch ops would otherwise leave the engine idle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kt_core.injected import BaseInjectedModule


def load_router(block: BaseInjectedModule, num_experts: int, buffers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``<key>.gate.weight`` (and ``<key>.gate.<buffer>`` for each of `buffers`) in float32 on the block's device.

    The weight's shape must be ``(num_experts, hidden_size)``: a file whose router does
    not fit the config would otherwise route to experts that do not exist.
    """
    source = block.gguf_loader
    if source is None:
        raise RuntimeError(f"{type(block).__name__} at {block.key} was created without a weight source")
    router = {}
    for name in ("weight", *buffers):
        router[name] = source.load(f"{block.key}.gate.{name}", dtype=torch.float32, device=block.device)
    expected = (num_experts, int(block.config.hidden_size))
    if tuple(router["weight"].shape) != expected:
        raise ValueError(
            f"{source.description}: {block.key}.gate.weight has shape {tuple(router['weight'].shape)}, "
            f"expected {expected}"
        )
    return router


def runs_asynchronously(module: nn.Module) -> bool:
    """Whether `module` (experts, or a shared MLP) can be started and waited for (``submit``/``sync``) instead of called."""
    return hasattr(module, "submit") and hasattr(module, "sync")


def start_experts(
    experts: nn.Module,
    tokens: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    match_tokens: bool = False,
) -> torch.Tensor | None:
    """Submit the routed experts if they run asynchronously (then None), else compute them now.

    Submitted experts get the float32 `weights` and cast them as they compute. With
    `match_tokens`, a plain transformers experts module gets ids and weights on the
    tokens' device and the weights in the tokens' dtype, as its own router would give
    them; without it, `ids` and `weights` are passed as they are.
    """
    if runs_asynchronously(experts):
        experts.submit(tokens, ids, weights)
        return None
    if match_tokens:
        return experts(tokens, ids.to(tokens.device), weights.to(device=tokens.device, dtype=tokens.dtype))
    return experts(tokens, ids, weights)


def finish_experts(experts: nn.Module, started: torch.Tensor | None) -> torch.Tensor:
    """The routed experts' output [T, H] from `start_experts`, waiting for them if they were submitted."""
    return experts.sync() if started is None else started


Route = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""A block's routing for the tokens at hand: (expert ids, float32 weights), both [T, k]."""


def overlap_experts(
    experts: nn.Module,
    shared: nn.Module | None,
    tokens: torch.Tensor,
    shared_input: torch.Tensor,
    route: Route,
    *,
    match_tokens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The routed experts' output [T, H] and the shared MLP's (of `shared_input`; None without one).

    As much runs at once as the modules allow: an asynchronous shared MLP is submitted
    first and computes while `route` runs; the routed experts are started next; a
    synchronous shared MLP is called while they compute; then everything is waited for.
    If anything fails once the shared MLP was submitted, it is waited for before the error
    propagates, so no job still writes into memory the caller has given up.
    """
    pending_shared = shared is not None and runs_asynchronously(shared)
    if pending_shared:
        shared.submit(shared_input)
    try:
        ids, weights = route()
        started = start_experts(experts, tokens, ids, weights, match_tokens=match_tokens)
    except BaseException:
        if pending_shared:
            shared.sync()
        raise
    if pending_shared:
        try:
            shared_out = shared.sync()
        except BaseException:
            finish_experts(experts, started)
            raise
    else:
        shared_out = shared(shared_input) if shared is not None else None
    return finish_experts(experts, started), shared_out


__all__ = ["Route", "finish_experts", "load_router", "overlap_experts", "runs_asynchronously", "start_experts"]
