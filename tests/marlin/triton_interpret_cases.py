"""Run Triton int4 matmul cases under triton's CPU interpreter; used by test_triton_interpret.py.

Runs in its own process: ``TRITON_INTERPRET=1`` must be set before triton is imported
(the ``@triton.jit`` decorator reads it once), and setting it in the pytest process
would leak into every other test file that process runs. Reads a JSON list of cases on
stdin and prints, per case, how far the kernel's output is beyond the tolerance
``atol + rtol·|reference|`` (≤ 0 means within it) against ``x @ (q·s)ᵀ`` computed in
float64 from the same int4 values.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from kt_ops_marlin.device_paths import TritonInt4Weight  # noqa: E402
from kt_ops_marlin.int4 import quantize_int4  # noqa: E402
from kt_ops_marlin.packing import pack_int4  # noqa: E402
from kt_ops_marlin.triton_kernel import Tiles, _interpreting, int4_matmul_triton  # noqa: E402


def run_case(case: dict) -> dict:
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    n, k, group_size = case["n"], case["k"], case["group_size"]
    lead = tuple(case["lead"])
    qw = quantize_int4(torch.randn(n, k, generator=gen) * 0.1, group_size, dtype)
    x = torch.randn(*lead, k, generator=gen).to(dtype)
    if case.get("wrapper"):
        weight = TritonInt4Weight(pack_int4(qw.q), qw.scales.t().contiguous(), qw.group_size, k, n)
        got = weight(x.float()).float()  # float32 in: computed in the scales' dtype, returned as float32
    else:
        tiles = Tiles(*case["tiles"]) if case.get("tiles") else None
        got = int4_matmul_triton(x, pack_int4(qw.q), qw.scales.t().contiguous(), qw.group_size, tiles=tiles)
        assert got.dtype == dtype, got.dtype
        got = got.float()
    expected = (x.double() @ qw.dequantize(torch.float64).t()).float()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    excess = (got - expected).abs() - (case["atol"] + case["rtol"] * expected.abs())
    return {"id": case["id"], "excess": float(excess.max()), "max_abs": float(expected.abs().max())}


def main() -> None:
    assert _interpreting(), "TRITON_INTERPRET=1 did not take effect"
    torch.set_num_threads(1)  # tiny numpy-emulated tiles; a second thread only adds waiting on a shared machine
    cases = json.load(sys.stdin)
    json.dump([run_case(c) for c in cases], sys.stdout)


if __name__ == "__main__":
    main()
