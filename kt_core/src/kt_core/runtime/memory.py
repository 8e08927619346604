"""Where a loaded model's memory is: torch tensors by device, and what native backends hold.

`kt bench` reports this beside peak RSS so a user can tell weights used in place from a
memory-mapped GGUF (shared with the page cache, no load-time copy) from memory a
backend had to make at load (repacked or dequantized copies) or keeps as scratch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torch import nn

from kt_core.backends import BackendMemory, _Backend
from kt_core.injected import BaseInjectedModule

MIB = 2**20


def _tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of distinct parameter and buffer storages, by device."""
    seen: set[tuple[str, int]] = set()
    total: dict[str, int] = defaultdict(int)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total[str(tensor.device)] += storage.nbytes()
    return dict(total)


def _backend_memory(model: nn.Module) -> dict[str, BackendMemory]:
    """Sum of `memory()` over the model's backends and operators, by class (those holding anything)."""
    sums: dict[str, BackendMemory] = defaultdict(BackendMemory)
    for module in model.modules():
        if isinstance(module, (_Backend, BaseInjectedModule)):
            sums[type(module).__name__] += module.memory()
    return {name: m for name, m in sorted(sums.items()) if m != BackendMemory()}


def memory_report(model: nn.Module) -> dict[str, Any]:
    """MiB of torch tensors per device, of each backend class's mapped/repacked/scratch memory,
    and of the memory backends share (counted once, not per class)."""
    backends = _backend_memory(model)
    shared = sum(backends.values(), BackendMemory()).shared
    return {
        "torch_tensors_mib": {dev: round(b / MIB, 1) for dev, b in sorted(_tensor_bytes(model).items())},
        "backends_mib": {
            name: {"mapped": round(m.mapped / MIB, 1), "repacked": round(m.repacked / MIB, 1),
                   "scratch": round(m.scratch / MIB, 1)}
            for name, m in backends.items()
        },
        "shared_mib": {name: round(size / MIB, 1) for name, size in shared},
    }


__all__ = ["memory_report"]
