"""Checking, before any weight is read, that the devices a plan uses exist on this machine.

Running a GPU rule file on a CPU-only machine (or a two-GPU file on one GPU) is a user
mistake, not a bug: without this check it surfaced as PyTorch's "Torch not compiled with
CUDA enabled" traceback from deep inside the loader. The message names the devices, a
module and the rule that put it there, and the `--device-map` that would run the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from kt_core.devices import device_type
from kt_core.errors import KtUserError
from kt_core.planner import DEVICE_KWARGS, TRANSFER_MAP, Decision, Plan


def _devices_of(decision: Decision) -> Iterator[str]:
    """Every device a decision uses: where the module runs and the devices in its kwargs."""
    yield decision.device
    kwargs: Mapping[str, Any] = decision.kwargs
    for key in DEVICE_KWARGS:
        if isinstance(kwargs.get(key), str):
            yield kwargs[key]
    transfer = kwargs.get(TRANSFER_MAP)
    if isinstance(transfer, Mapping):
        yield from (d for d in transfer.values() if isinstance(d, str))


def _index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def check_plan_devices(result: Plan, cuda_device_count: Callable[[], int] | None = None) -> None:
    """Raise a `KtUserError` if the plan uses a CUDA device this machine does not have.

    `cuda_device_count` (for tests) defaults to the number of CUDA devices PyTorch sees
    (0 when it was built without CUDA).
    """
    count = (cuda_device_count or (lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0))()
    first_use: dict[str, Decision] = {}
    for decision in result.decisions:
        for device in _devices_of(decision):
            if device_type(device) == "cuda" and _index(device) >= count:
                first_use.setdefault("cuda:0" if device == "cuda" else device, decision)
    if not first_use:
        return
    missing = sorted(first_use, key=_index)
    device, decision = missing[0], first_use[missing[0]]
    where = decision.module or "(root)"
    rule = next((r for r in result.rules if r.index == decision.rule), None)
    if rule is not None:
        where += f", by the rule at {rule.location}"
    have = "no CUDA device" if count == 0 else f"{count} CUDA device(s) (cuda:0–cuda:{count - 1})"
    remap = " ".join(f"--device-map {d}={'cpu' if count == 0 else 'cuda:0'}" for d in missing)
    raise KtUserError(
        f"the plan uses {', '.join(missing)} (first {device} at {where}), but this machine has {have}. "
        f"Run the rule file elsewhere, or remap: {remap}"
    )
