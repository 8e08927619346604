"""Device strings in rule files, and the `--device-map` remapping of them.

Rule files name devices as ``cpu``, ``cuda`` or ``cuda:N``. They are checked for form
when a rule file is validated (a rule file written on a GPU machine must still validate
on a laptop) and for availability only when a model is actually placed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

from kt_core.errors import KtUserError

DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]+)?)$"
_DEVICE_RE = re.compile(DEVICE_PATTERN)


def check_device(value: str) -> str:
    """Return `value` if it is a device string kt understands, else raise ValueError."""
    if not _DEVICE_RE.match(value):
        raise ValueError(f"{value!r} is not a device; expected 'cpu', 'cuda' or 'cuda:N'")
    return value


Device = Annotated[
    str,
    AfterValidator(check_device),
    WithJsonSchema({"type": "string", "pattern": DEVICE_PATTERN, "examples": ["cpu", "cuda", "cuda:0"]}),
]
"""A pydantic field type for device kwargs (``generate_device``, ``out_device``…)."""


def device_type(device: str) -> str:
    """``"cuda:1"`` → ``"cuda"``."""
    return device.split(":", 1)[0]


@dataclass(frozen=True)
class DeviceMap:
    """Remaps planned devices, e.g. ``cuda:0=cpu`` to run a GPU rule file on a CPU-only machine.

    A source device ``cuda`` (without an index) matches every CUDA device; ``cuda:0``
    matches ``cuda:0`` and plain ``cuda`` (which PyTorch treats as the current device,
    index 0 unless changed). Exact entries win over the bare ``cuda`` entry.
    """

    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, items: Iterable[str]) -> DeviceMap:
        """Parse ``FROM=TO`` strings as given on the command line."""
        pairs = []
        for item in items:
            src, sep, dst = item.partition("=")
            if not sep:
                raise KtUserError(f"--device-map {item!r}: expected FROM=TO, for example cuda:0=cpu")
            for part in (src, dst):
                if not _DEVICE_RE.match(part):
                    raise KtUserError(
                        f"--device-map {item!r}: {part!r} is not a device; expected cpu, cuda or cuda:N"
                    )
            pairs.append((src, dst))
        return cls(tuple(pairs))

    def apply(self, device: str) -> str:
        """The device `device` is mapped to (itself when no entry matches)."""
        normalized = "cuda:0" if device == "cuda" else device
        for src, dst in self.pairs:
            if src == device or src == normalized:
                return dst
        for src, dst in self.pairs:
            if src == "cuda" and device_type(device) == "cuda":
                return dst
        return device

    def __bool__(self) -> bool:
        return bool(self.pairs)
