"""The Triton kernel on the CPU under ``TRITON_INTERPRET=1``, small shapes, against ``x @ (q·s)ᵀ``.

The cases run in one child process (`triton_interpret_cases.py`), so the interpreter
setting never reaches other tests. They cover decode (M = 1) and prefill-like batches,
every tile-size branch, masking in M, N and K (per-channel K = 48 under a 128-wide K
tile), group sizes whose tile is narrower than the group (96 → 32-wide tiles), the K
split, and all three activation dtypes.

Tolerances against the float64 reference (same int4 values and scales):

* float32: float32 accumulation of ≤ 256 products — atol 1e-5 (outputs are ~1);
* bfloat16 / float16: products are exact and accumulation is float32, so the error is the
  final rounding to the 16-bit dtype, half an ulp: rtol 2^-8 (bf16) / 2^-10 (fp16) with
  atol 1e-3 for outputs near zero.

On a GPU the same kernel multiplies bfloat16 tiles in bfloat16 (tensor cores); under the
interpreter it multiplies them in float32 because triton 3.9's interpreter mis-emulates
bfloat16 conversions (see `triton_kernel._fp32_dot`) — the products are the same, exact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TOL = {"float32": (1e-5, 0.0), "bfloat16": (1e-3, 2**-8), "float16": (1e-3, 2**-10)}

CASES = [
    # id, dtype, lead (M…), n, k, group_size, tiles (block_m, block_n, block_k, split_k) or None
    ("decode-fp32-g32", "float32", [1], 48, 64, 32, None),
    ("decode-bf16-g64-split4", "bfloat16", [1], 40, 256, 64, [16, 16, 32, 4]),
    ("per-channel-fp32-k48", "float32", [3], 24, 48, -1, None),
    ("per-channel-bf16-k48", "bfloat16", [3], 24, 48, -1, None),
    ("bf16-g64", "bfloat16", [5], 40, 128, 64, None),
    ("fp16-g32-split3-masked", "float16", [17], 70, 96, 32, [16, 32, 32, 3]),
    ("bf16-m33-g128", "bfloat16", [33], 64, 256, 128, None),
    ("fp16-g96", "float16", [4], 32, 192, 96, None),
    ("fp32-uneven-split", "float32", [2], 16, 160, 32, [16, 16, 32, 2]),
    ("wrapper-bf16-batch", "bfloat16", [2, 3], 32, 64, 32, "wrapper"),
]


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    payload = []
    for case_id, dtype, lead, n, k, group_size, tiles in CASES:
        atol, rtol = TOL[dtype]
        payload.append({
            "id": case_id, "dtype": dtype, "lead": lead, "n": n, "k": k, "group_size": group_size,
            "tiles": tiles if isinstance(tiles, list) else None, "wrapper": tiles == "wrapper",
            "atol": atol, "rtol": rtol, "seed": len(payload),
        })
    script = Path(__file__).with_name("triton_interpret_cases.py")
    proc = subprocess.run(
        [sys.executable, str(script)], input=json.dumps(payload), capture_output=True, text=True, timeout=300,
        env=_child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["id"]: r for r in json.loads(proc.stdout)}


def _child_env() -> dict[str, str]:
    return {**os.environ, "TRITON_INTERPRET": "1"}


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_kernel_matches_dequantized_reference(results, case_id):
    result = results[case_id]
    assert result["max_abs"] > 0.1  # the case computes something
    assert result["excess"] <= 0, f"{case_id}: {result['excess']:.3g} beyond tolerance"

