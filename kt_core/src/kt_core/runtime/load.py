"""Turning a config, a rule file and a weight source into a ready model.

The steps, in order, each checkable on its own:

1. build the transformers model on ``meta`` (no memory);
2. plan (rules → one decision per module), check operators accept their modules and
   that the planned devices exist on this machine;
3. check the weight source against what the planned model will read (every missing
   or mis-shaped tensor listed in one error, before any weight is read);
4. inject operators (still on meta);
5. load: operators read their own weights (`load()`), kept modules get their
   parameters and buffers from the source on their planned device;
6. verify nothing is left on ``meta`` and install device-boundary hooks where a kept
   module sits on another device than its parent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.devices import DeviceMap
from kt_core.errors import KtUserError
from kt_core.inject import check_replacements, inject
from kt_core.injected import BaseInjectedModule
from kt_core.model_config import build_meta_model
from kt_core.planner import Plan, plan
from kt_core.registry import Registry
from kt_core.rules.diagnostics import RuleFileError
from kt_core.rules.loader import RuleSet
from kt_core.runtime.device_check import check_plan_devices
from kt_core.runtime.placement import install_device_boundaries
from kt_core.runtime.progress import progress
from kt_core.weights.source import WeightSource


@dataclass
class LoadedModel:
    """A model ready to run, with the plan that built it."""

    model: nn.Module
    plan: Plan
    config: PretrainedConfig
    operators: list[BaseInjectedModule]
    warnings: list[str]


def _plain_modules(model: nn.Module, result: Plan) -> Iterable[tuple[str, nn.Module]]:
    """Modules of the original tree whose own tensors the runtime loads.

    Operators load their own weights; a child an operator declares it consumes
    (`BaseInjectedModule.consumed_children`, e.g. the router inside an MoE block) is
    skipped, and so is everything an operator created itself (its backends), which is
    not in the plan.
    """
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if name not in result:
            continue
        if isinstance(module, BaseInjectedModule):
            consumed = set(module.consumed_children())
            for child_name, child in module.named_children():
                if child_name not in consumed:
                    stack.append((f"{name}.{child_name}", child))
            continue
        yield name, module
        stack.extend((f"{name}.{c}" if name else c, child) for c, child in module.named_children())


def _keep_fp32_patterns(model: nn.Module) -> list[str]:
    patterns = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return patterns


def _dtype_for(full_name: str, dtype: torch.dtype, fp32_patterns: list[str]) -> torch.dtype:
    if any(fnmatch.fnmatch(full_name, f"*{p}") or full_name.endswith(p) for p in fp32_patterns):
        return torch.float32
    return dtype


def check_source(model: nn.Module, source: WeightSource, config: PretrainedConfig) -> list[str]:
    """Check the source holds every stored tensor of the (meta, not yet injected) model.

    Missing tensors and shape mismatches are all listed in one error naming the source,
    together with the source's tensors the model has no place for: beside a missing
    tensor those usually show what went wrong (another model, another naming). Unused
    tensors alone are only returned as warnings, because real checkpoints carry some
    (DeepSeek-V3's multi-token-prediction layer, which transformers does not build).
    """
    missing, mismatched = [], []
    expected = model.state_dict(keep_vars=True)
    for full, tensor in expected.items():
        lookup = _tied_name(full, config, source)
        if not source.has(lookup):
            missing.append(full)
            continue
        shape = tuple(source.info(lookup).shape)
        if shape != tuple(tensor.shape):
            mismatched.append(f"{full}: source has {shape}, model expects {tuple(tensor.shape)}")
    modules = dict(model.named_modules())
    unexpected = sorted(n for n in source.names() if not _belongs_to(n, modules))
    if missing or mismatched:
        lines = [f"{source.description} does not match the model ({type(model).__name__}):"]
        if missing:
            shown = ", ".join(missing[:12]) + (" …" if len(missing) > 12 else "")
            lines.append(f"  missing tensors ({len(missing)}): {shown}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}):")
            lines += [f"    {m}" for m in mismatched[:12]]
        if unexpected:
            shown = ", ".join(unexpected[:12]) + (" …" if len(unexpected) > 12 else "")
            lines.append(f"  unexpected tensors, not used by the model ({len(unexpected)}): {shown}")
        lines.append("Check that the weights belong to this model and config.")
        raise KtUserError("\n".join(lines))
    if not unexpected:
        return []
    shown = ", ".join(unexpected[:6]) + (" …" if len(unexpected) > 6 else "")
    return [f"{source.description}: {len(unexpected)} tensors are not used by the model: {shown}"]


def _belongs_to(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether a source tensor is part of the model, possibly stored differently.

    Checkpoints store experts one by one (``mlp.experts.3.up_proj.weight``) where the model
    holds them stacked: such a name's deepest existing ancestor is a module with tensors
    of its own. A name under a module that does not exist at all (a layer beyond the
    model's, an extra prediction head) ends at a container with no tensors of its own.
    """
    path = name.rpartition(".")[0]
    while path and path not in modules:
        path = path.rpartition(".")[0]
    if path == name.rpartition(".")[0]:
        return True
    owner = modules.get(path)
    return owner is not None and any(True for _ in owner.parameters(recurse=False))


def _tied_name(full: str, config: PretrainedConfig, source: WeightSource) -> str:
    """``lm_head.weight`` reads the embedding when the config ties them and the source lacks it."""
    if full == "lm_head.weight" and getattr(config, "tie_word_embeddings", False) and not source.has(full):
        return "model.embed_tokens.weight"
    return full


def _load_kept(model: nn.Module, result: Plan, source: WeightSource, config: PretrainedConfig, dtype: torch.dtype) -> None:
    fp32 = _keep_fp32_patterns(model)
    for name, module in list(_plain_modules(model, result)):
        device = result[name].device
        stored = [(a, t, True) for a, t in module.named_parameters(recurse=False)]
        stored += [(a, t, False) for a, t in module.named_buffers(recurse=False)
                   if a not in getattr(module, "_non_persistent_buffers_set", set())]
        for attr, tensor, is_param in stored:
            if not tensor.is_meta:
                continue
            full = f"{name}.{attr}" if name else attr
            target = _dtype_for(full, dtype if tensor.is_floating_point() else tensor.dtype, fp32)
            value = source.load(_tied_name(full, config, source), dtype=target, device=device)
            if is_param:
                setattr(module, attr, nn.Parameter(value, requires_grad=False))
            else:
                module._buffers[attr] = value


def _left_on_meta(model: nn.Module, result: Plan) -> list[str]:
    """Tensors still on meta in modules the runtime is responsible for."""
    names = []
    for name, module in _plain_modules(model, result):
        prefix = f"{name}." if name else ""
        names += [prefix + a for a, p in module.named_parameters(recurse=False) if p.is_meta]
        names += [prefix + a for a, b in module.named_buffers(recurse=False) if b.is_meta]
    return names


def load_model(
    config: PretrainedConfig,
    rules: RuleSet,
    source: WeightSource,
    registry: Registry,
    *,
    device_map: DeviceMap | None = None,
    dtype: torch.dtype = torch.bfloat16,
    show_progress: bool | None = None,
) -> LoadedModel:
    """Build, plan, inject and load a model (the module docstring lists the steps)."""
    model = build_meta_model(config, registry, dtype)
    result = plan(model, rules, device_map=device_map)
    problems = check_replacements(model, result, registry)
    if problems:
        raise RuleFileError(problems)
    check_plan_devices(result)
    warnings = check_source(model, source, config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # backends without an explicit dtype use the model's
    try:
        operators = inject(model, result, config=config, source=source, registry=registry)
        problems = [problem for op in operators for problem in op.check_weights()]
        if problems:
            shown = "\n  ".join(problems[:10]) + (f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise KtUserError(f"{source.description}: the planned operators cannot use these weights:\n  {shown}")
        for op in progress(operators, total=len(operators), desc="loading weights", unit="op", enabled=show_progress):
            op.load()
        _load_kept(model, result, source, config, dtype)
    finally:
        torch.set_default_dtype(previous)
    left = _left_on_meta(model, result)
    if left:
        raise KtUserError(
            f"{len(left)} tensors were not loaded and are still on the meta device: {', '.join(left[:8])}"
            + (" …" if len(left) > 8 else "")
            + ". Buffers computed at construction (like a rotary embedding's inv_freq) need a load-time "
            "operator: add a rule replacing that module (e.g. YarnRotaryEmbedding or RotaryEmbedding)."
        )
    install_device_boundaries(model, result)
    model.eval()
    return LoadedModel(model, result, config, operators, warnings)
