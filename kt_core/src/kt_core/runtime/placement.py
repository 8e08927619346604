"""Moving activations across device boundaries of kept modules.

Operators move their inputs to their own device and return outputs where the input
was. Kept (``default``) modules are plain transformers modules that expect inputs on
their device; where a rule places one on another device than its parent, a forward
pre-hook moves its tensor inputs there and a forward hook returns the output to the
caller's device. No hooks are installed where parent and child share a device, so a
single-device run has none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kt_core.injected import BaseInjectedModule
from kt_core.planner import Plan
from kt_core.transfer import move_to


def _first_tensor_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def install_device_boundaries(model: nn.Module, result: Plan) -> int:
    """Add move-in/move-out hooks to kept modules placed off their parent's device; return how many."""
    count = 0
    for name, module in model.named_modules():
        if not name or isinstance(module, BaseInjectedModule) or name not in result:
            continue
        parent = name.rpartition(".")[0]
        if parent not in result:
            continue
        device = result[name].device
        if device == result[parent].device or result[name].origin == "covered":
            continue
        _add_hooks(module, torch.device(device))
        count += 1
    return count


def _add_hooks(module: nn.Module, device: torch.device) -> None:
    state: dict[str, torch.device | None] = {"caller": None}

    def before(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        state["caller"] = _first_tensor_device(args, kwargs)
        return move_to(args, device), move_to(kwargs, device)

    def after(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        caller = state["caller"]
        return output if caller is None else move_to(output, caller)

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)
