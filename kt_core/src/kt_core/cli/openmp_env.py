"""Make torch's OpenMP threads sleep when idle, before torch is loaded.

GNU OpenMP (torch's CPU threads) keeps a worker spinning for a while after each parallel
region unless told otherwise. kt's CPU engine runs its own worker threads, one per core,
and hands them a job between every few torch operations; a spinning OpenMP worker takes
a core from them each time. On a machine with other load this is drastic: on the
project's 2-core VM with two other busy processes, decoding the 4-layer synthetic
DeepSeek-V2-Lite (benchmarks/synthetic_model.py) fell from 8.8 tokens/s with
``OMP_WAIT_POLICY=PASSIVE`` to 2.0 with OpenMP's default; idle, PASSIVE was as fast or
slightly faster. libgomp reads the variable once, when torch loads it, so `kt` sets it
first thing — unless the user set it, which always wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_openmp(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless set already; True if it will take effect.

    It cannot take effect once torch is imported (libgomp has read its environment by
    then), which is why the `kt` entry point calls this before importing anything else.
    """
    environ = os.environ if environ is None else environ
    if WAIT_POLICY in environ:
        return False
    environ[WAIT_POLICY] = "PASSIVE"
    return "torch" not in sys.modules
