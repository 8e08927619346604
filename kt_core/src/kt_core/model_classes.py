"""A helper for model plugins: register a transformers modeling module's classes for matching."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def register_transformers_classes(
    register: Callable[..., None], module: str, classes: Mapping[str, Sequence[str]]
) -> None:
    """Register each class of `module` (a transformers modeling module) with its aliases.

    `classes` maps a class name to its extra names, typically the KTransformers spellings
    (``ktransformers.models.modeling_deepseek.DeepseekV2MoE``) so rule files written for
    KTransformers match the transformers 5 class that plays the same part.
    """
    for name, aliases in classes.items():
        register(name=name, target=f"{module}:{name}", aliases=tuple(aliases), summary=f"transformers {name}")
