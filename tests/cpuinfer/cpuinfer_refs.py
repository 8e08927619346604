"""References and error bounds for the CPU engine's tests.

The independent reference for every weight type is gguf-py's numpy `dequantize` followed
by a float64 matmul. The engine differs from it only by how it prepares activations
(`activation_error`) and by float32 rounding, so each comparison uses a bound derived
from those two sources instead of a guessed tolerance:

* Q8_32 / Q8_256 activations (ggml's Q8_0 / Q8_K): per block of 32 / 256 values
  d = max|x| / 127 and q = round(x / d), so every value is off by at most d / 2
  = max|x_block| / 254. A dot product with a weight row w is then off by at most
  sum_i |w_i| * e_i (integer products and sums are exact).
* BF16 activations (AVX-512 BF16 kernel): round to nearest bfloat16, |error| <= 2^-9 |x|.
* F32 activations: no activation error.
* float32 accumulation: at most (n + 8) * 2^-23 * sum_i |w_i x_i| for n terms (the
  classic n*u bound for recursive summation, with slack for the scale products).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import gguf
import numpy as np
import torch

from kt_core.backends import BackendMemory
from kt_core.quant.quantize import quantize
from kt_core.weights.source import MissingTensorError, RawTensor, TensorInfo
from kt_ops_cpuinfer import _engine, supported_isas

ISAS = supported_isas()
"""Kernel paths this CPU runs; tests run every one of them (both, on an AVX-512 machine)."""

QUANT_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")
SILU_LIPSCHITZ = 1.0999  # max |silu'(x)| = 1.0998... (at x ~ 2.4)


def own_memory(backend: object) -> BackendMemory:
    """`backend.memory()` without the pool's shared working buffers (their size depends on
    what ran before on the same pool, in this test or another)."""
    return dataclasses.replace(backend.memory(), shared=())  # type: ignore[attr-defined]


def block_size(ggml_type: str) -> int:
    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0])


def type_size(ggml_type: str) -> int:
    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][1])


def make_blocks(weight: torch.Tensor, ggml_type: str) -> np.ndarray:
    """`weight` [..., cols] encoded as GGUF blocks [..., bytes_per_row] (kt's quantizer; gguf-py's for Q5_0)."""
    if ggml_type == "Q5_0":  # kt convert does not write Q5_0; gguf-py does
        return gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q5_0)
    return quantize(weight, ggml_type)


def random_blocks(shape: tuple[int, ...], ggml_type: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes that form valid blocks: every code pattern, finite scales of varied size.

    Covers what a quantizer never writes (e.g. Q8_0 code -128, any Q6_K scale sign).
    """
    *lead, cols = shape
    bs, ts = block_size(ggml_type), type_size(ggml_type)
    n_blocks = int(np.prod(lead, dtype=np.int64)) * (cols // bs)
    if ggml_type in FLOAT_TYPES:
        values = rng.standard_normal((n_blocks,)).astype(np.float32)
        return make_blocks(torch.from_numpy(values).reshape(*lead, cols), ggml_type)
    blocks = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    # fp16 scale fields: d (and dmin) drawn log-uniformly, with random signs
    scale_offsets = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for off in scale_offsets[ggml_type]:
        d = (rng.choice([-1.0, 1.0], n_blocks) * 10.0 ** rng.uniform(-3, -1, n_blocks)).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*lead, cols // bs * ts)


def dequantize(blocks: np.ndarray, ggml_type: str) -> np.ndarray:
    """gguf-py's dequantization, as float64 of the logical shape."""
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type]).astype(np.float64)


def activation_error(x: np.ndarray, fmt: str) -> np.ndarray:
    """Per-value bound on |x - prepared x| for activation format `fmt` (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    if fmt == "F32":
        return np.zeros_like(x)
    if fmt == "BF16":
        return np.abs(x) * 2.0**-9
    block = {"Q8_32": 32, "Q8_256": 256}[fmt]
    xb = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    return np.broadcast_to(amax / 254.0 * (1 + 2.0**-20), xb.shape).reshape(x.shape)


def matmul_bound(x: np.ndarray, w: np.ndarray, fmt: str) -> np.ndarray:
    """Bound on |engine(x @ w.T) - x @ w.T| for activations [T, n] and weights [rows, n]."""
    aw = np.abs(w)
    n = w.shape[-1]
    return activation_error(x, fmt) @ aw.T + (n + 8) * 2.0**-23 * (np.abs(x) @ aw.T)


def engine_gemm(isa: str, ggml_type: str, blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """out [T, rows] = x [T, cols] @ W.T by one engine kernel call on the blocks of W."""
    rows = int(np.prod(blocks.shape[:-1]))
    data = np.ascontiguousarray(blocks).reshape(rows, -1)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x32.shape[0], rows), dtype=np.float32)
    _engine.gemm(isa, ggml_type, data.ctypes.data, rows, x32.shape[1], data.shape[1], x32.ctypes.data,
                 x32.shape[0], out.ctypes.data)
    return out


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def moe_reference(
    x: np.ndarray, ids: np.ndarray, weights: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
    formats: tuple[str, str, str],
) -> tuple[np.ndarray, np.ndarray]:
    """float64 routed experts (SiLU) and a bound on the engine's difference from them.

    `gate`/`up` [E, I, H] and `down` [E, H, I] are dequantized weights; `formats` the
    activation formats of gate, up and down. Error propagation: gate/up outputs are off by
    Bg, Bu (`matmul_bound`); since silu is 1.0999-Lipschitz, h = silu(g) u is off by at most
    Bh = 1.0999 Bg (|u| + Bu) + |silu(g)| Bu; the down projection sees h off by Bh plus its
    own activation error (taken at |h| + Bh, which bounds the engine's block maxima) and adds
    its float32 rounding; slots are summed with |routing weight|.
    """
    T, K = ids.shape
    H = x.shape[1]
    ref = np.zeros((T, H))
    bound = np.zeros((T, H))
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if e < 0 or e >= gate.shape[0]:
                continue
            xt = x[t:t + 1].astype(np.float64)
            g, u = xt @ gate[e].T, xt @ up[e].T
            bg, bu = matmul_bound(xt, gate[e], formats[0]), matmul_bound(xt, up[e], formats[1])
            h = silu(g) * u
            bh = SILU_LIPSCHITZ * bg * (np.abs(u) + bu) + np.abs(silu(g)) * bu + 1e-6 * np.abs(h)
            hmax = np.abs(h) + bh
            ad = np.abs(down[e])
            by = (bh + activation_error(hmax, formats[2])) @ ad.T + (down.shape[2] + 8) * 2.0**-23 * (hmax @ ad.T)
            ref[t] += weights[t, k] * (h @ down[e].T)[0]
            bound[t] += abs(weights[t, k]) * by[0]
    return ref, bound


class BlockSource:
    """A `WeightSource` over GGUF blocks held in memory: `raw` gives the blocks, `load`
    dequantizes them with gguf-py (so KExpertsTorch sees exactly the same weights)."""

    def __init__(self, tensors: Mapping[str, tuple[str, tuple[int, ...], np.ndarray]], description: str = "blocks") -> None:
        self._tensors = dict(tensors)
        self.description = description

    def names(self) -> Iterator[str]:
        return iter(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str) -> tuple[str, tuple[int, ...], np.ndarray]:
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensorError(name, self.description) from None

    def info(self, name: str) -> TensorInfo:
        ggml_type, shape, blocks = self._get(name)
        return TensorInfo(name, shape, ggml_type, blocks.nbytes)

    def load(self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        ggml_type, shape, blocks = self._get(name)
        values = dequantize(blocks, ggml_type).reshape(shape)
        return torch.from_numpy(values).to(device=device, dtype=dtype or torch.float32)

    def raw(self, name: str) -> RawTensor:
        ggml_type, shape, blocks = self._get(name)
        data = np.ascontiguousarray(blocks).reshape(-1)
        return RawTensor(name, ggml_type, shape, data)
