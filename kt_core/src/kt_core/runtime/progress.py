"""Progress bars for long work (loading weights, converting), quiet when not on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it", enabled: bool | None = None) -> Iterator[T]:
    """Wrap `items` in a progress bar on stderr (shown only when stderr is a terminal by default)."""
    show = sys.stderr.isatty() if enabled is None else enabled
    return iter(tqdm(items, total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr, dynamic_ncols=True, leave=False))
