"""Per-sub-block scale searches for the K-quants, vectorized over sub-blocks.

Rounding to a fixed grid makes the error a non-smooth function of the scale, so the
obvious scale (range / levels) is rarely the best one. ggml's reference K-quant
quantizers therefore try a small ladder of scales around the obvious one; for each they
round the values, re-fit the scale (and offset) by weighted least squares for those
fixed integer codes, and keep the candidate with the smallest weighted squared error.
These functions run the same searches with every step vectorized over all sub-blocks.

Each candidate needs only a few weighted sums over the sub-block (``Σ w·l``, ``Σ w·l²``,
``Σ w·x·l``); the least-squares fit and its error follow from them in closed form, so
the only full-size work per candidate is rounding and forming the sums.

Performance notes: candidates are visited one after another (the Q4_K/Q5_K search
needs that anyway, since each step starts from the best offset so far), and the
full-size intermediates live in a few buffers allocated once per call and reused by
every step with in-place ops. Allocating fresh megabyte-sized tensors per step makes
glibc hand memory back and forth to the kernel, and the resulting page faults cost more
than the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GROUP_MAX_EPS = 1e-15
"""Sub-blocks whose largest magnitude is below this are treated as all zero (as ggml does)."""

_TINY = 1e-30
"""Lower bound for divisors that are zero only in degenerate (all-equal or all-zero) sub-blocks."""

_ILL_CONDITIONED = 1e-4
"""Relative determinant below which the two-parameter fit is not trusted.

The determinant ``Σw·Σw·l² - (Σw·l)²`` vanishes when every code in the sub-block is the
same; computed from float32 sums it is then a rounding residue (relative size ~1e-6)
whose inverse is garbage. Rejecting fits below 1e-4 leaves a 100x margin; such a
candidate still competes through its offset-free fit.
"""


class _SumBuffers:
    """Reusable (S, n) scratch space for the weighted sums of one candidate's codes."""

    def __init__(self, like: torch.Tensor) -> None:
        self.products = torch.empty_like(like)
        self.scratch = torch.empty_like(like)

    def sums(self, codes: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``Σ w·l``, ``Σ w·l²``, ``Σ w·x·l`` over the last dim, each shaped (S, 1)."""
        wl = torch.mul(codes, weights, out=self.products)
        sum_l = wl.sum(-1, keepdim=True)
        return (sum_l, *self._finish(wl, codes, x))

    def symmetric_sums(self, codes: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``Σ w·l²``, ``Σ w·x·l`` only: a symmetric fit needs no ``Σ w·l``."""
        return self._finish(torch.mul(codes, weights, out=self.products), codes, x)

    def _finish(self, wl: torch.Tensor, codes: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sum_xl = torch.mul(wl, x, out=self.scratch).sum(-1, keepdim=True)
        sum_l2 = wl.mul_(codes).sum(-1, keepdim=True)
        return sum_l2, sum_xl


def search_scale_and_offset(
    x: torch.Tensor,
    weights: torch.Tensor,
    levels: int,
    first_step: float,
    step: float,
    n_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``scale ≥ 0`` and ``offset ≥ 0`` with ``x ≈ scale * q - offset``, ``q ∈ [0, levels]``.

    `x` and `weights` are (S, n) float32 sub-blocks. This is the search Q4_K and Q5_K
    need: the offset is stored as a non-negative "min" that is subtracted, so the
    represented range always includes zero.

    It starts from the plain range quantization (``lo = min(min(x), 0)``, scale
    ``(max(x) - lo) / levels``) and then, for ``i in range(n_steps + 1)``, rounds
    ``(x - m) * (levels + first_step + i * step) / (max(x) - m)``, where ``-m`` is the best
    offset found so far, re-fits scale and offset to those codes by weighted least
    squares, and keeps the fit if it lowers the weighted squared error. Each step thus
    refines the previous best, as in ggml's reference. Where the fit wants a negative
    offset it is redone with offset 0, the constrained optimum. Returns two (S,) float32
    tensors.
    """
    lo = x.amin(-1, keepdim=True).clamp_max_(0)
    hi = x.amax(-1, keepdim=True)
    span = hi - lo
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)
    det_floor = _ILL_CONDITIONED * sum_w
    buffers = _SumBuffers(x)
    codes = torch.empty_like(x)

    # Start: the plain range quantization, its error from the closed form
    # Σw(scale·l + m - x)² - Σw·x² = scale·(scale·Σwl² + 2m·Σwl - 2Σwxl) + m·(m·Σw - 2Σwx).
    scale = span / levels
    m = lo
    torch.sub(x, lo, out=codes).mul_(levels / span.clamp_min(_TINY)).round_().clamp_(0, levels)
    s_l, s_l2, s_xl = buffers.sums(codes, weights, x)
    best = scale * (scale * s_l2 + 2 * m * s_l - 2 * s_xl) + m * (m * sum_w - 2 * sum_x)

    for i in range(n_steps + 1):
        inv = (levels + first_step + i * step) / (hi - m).clamp_min_(_TINY)
        torch.sub(x, m, out=codes).mul_(inv).round_().clamp_(0, levels)
        s_l, s_l2, s_xl = buffers.sums(codes, weights, x)

        # Free fit: the 2x2 normal equations. At a least-squares optimum the error
        # (up to Σw·x²) reduces to -(scale·Σwxl + m·Σwx).
        det = sum_w * s_l2 - s_l * s_l
        free = det > det_floor * s_l2
        det = torch.where(free, det, 1.0)
        fit_m = (s_l2 * sum_x - s_l * s_xl) / det
        free &= fit_m <= 0
        fit_scale = torch.where(free, (sum_w * s_xl - sum_x * s_l) / det, s_xl / s_l2.clamp_min(_TINY))
        fit_m = fit_m * free
        err = -(fit_scale * s_xl + fit_m * sum_x)
        # Offset-0 fits must have a positive scale to be storable.
        better = (free | (s_xl > 0)) & (err < best)

        best = torch.where(better, err, best)
        scale = torch.where(better, fit_scale, scale)
        m = torch.where(better, fit_m, m)

    flat = span <= 0
    # A flat sub-block (all values equal and ≤ 0) is exactly its offset.
    scale = torch.where(flat, 0.0, scale.clamp_min(0))
    offset = torch.where(flat, -lo, (-m).clamp_min(0))
    return scale.squeeze(1), offset.squeeze(1)


def search_symmetric_scale(
    x: torch.Tensor, levels: int, n_steps: int = 9, step: float = 0.1, uniform_weights: bool = False
) -> torch.Tensor:
    """Best signed scale with ``x ≈ scale * q``, ``q ∈ [-levels, levels - 1]`` (Q6_K: levels 32).

    `x` is (S, n) float32. The code range is asymmetric, so the value of largest
    magnitude is mapped to ``-levels`` (its sign decides the sign of the scale) to use
    the extra negative code. Candidates scale that mapping by ``levels + i * step`` for
    ``i in [-n_steps, n_steps]``; each is re-fitted by least squares with weights ``x²``
    (large values dominate the error of a matmul), and the fit with the largest error
    reduction ``(Σw·x·l)² / Σw·l²`` wins, the plain mapping (``i = 0``) on ties.
    Sub-blocks below `GROUP_MAX_EPS` get scale 0. Returns an (S,) float32 tensor.
    With `uniform_weights` every value weighs the same, so the plain squared error is
    minimized instead (the low-bit types, whose coarse grid makes that trade-off matter).
    """
    index = x.abs().argmax(dim=-1, keepdim=True)
    extreme = torch.gather(x, -1, index)
    tiny = extreme.abs() < GROUP_MAX_EPS
    safe_extreme = torch.where(tiny, 1.0, extreme)
    # The sums use x / extreme ∈ [-1, 1]: with weights x² they grow like x⁴ and would
    # under- or overflow float32 for tiny or huge blocks. The scale is rescaled after.
    unit = x / safe_extreme
    weights = torch.ones_like(unit) if uniform_weights else unit * unit
    buffers = _SumBuffers(x)
    codes = torch.empty_like(x)

    best_gain = torch.full_like(extreme, -1.0)
    best_scale = torch.zeros_like(extreme)
    for i in [0] + [i for i in range(-n_steps, n_steps + 1) if i != 0]:
        # Codes from x itself, in float32, as the reference computes them.
        inv = -(levels + step * i) / safe_extreme
        torch.mul(x, inv, out=codes).round_().clamp_(-levels, levels - 1)
        s_l2, s_xl = buffers.symmetric_sums(codes, weights, unit)
        fit = s_xl / s_l2.clamp_min(_TINY)
        gain = fit * s_xl
        better = (s_l2 > 0) & (gain > best_gain)
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, fit, best_scale)

    scale = best_scale * extreme
    return torch.where(tiny, 0.0, scale).squeeze(1)


class NearestEntry:
    """Nearest-entry lookup in a fixed ascending codebook of integers (IQ4_NL's).

    Between two integer entries the midpoint is a multiple of ½, so every half-open bin
    ``[k/2, (k+1)/2)`` lies on one side of every midpoint and the nearest entry of a value
    is a table lookup at ``floor(2 * value)``: one gather, about 8x faster than a binary
    search (`torch.bucketize`) plus a gather. A value exactly on a midpoint goes to the
    upper entry; values beyond the ends clamp to the end entries.
    """

    def __init__(self, grid: tuple[int, ...]) -> None:
        entries = torch.tensor(grid, dtype=torch.float32)
        assert bool((entries[1:] > entries[:-1]).all()), "the codebook must be ascending"
        self.entries = entries
        self._low = float(grid[0]) - 1.0
        n_bins = int(2 * (grid[-1] + 1 - self._low)) + 1
        edges = self._low + torch.arange(n_bins, dtype=torch.float32) / 2
        index = torch.bucketize(edges, (entries[1:] + entries[:-1]) / 2, right=True)
        self._index_table = index.to(torch.uint8)
        self._value_table = entries[index]
        self._last_bin = n_bins - 1

    def _bins(self, values: torch.Tensor) -> torch.Tensor:
        # Clamped to be non-negative first, so truncation is floor.
        return values.sub(self._low).mul_(2).clamp_(0, self._last_bin).long()

    def indices(self, values: torch.Tensor) -> torch.Tensor:
        """Index (uint8) of the entry nearest to each value."""
        return self._index_table[self._bins(values)]

    def values(self, values: torch.Tensor) -> torch.Tensor:
        """The entry (float32) nearest to each value."""
        return self._value_table[self._bins(values)]


def search_grid_scale(
    x: torch.Tensor, grid: NearestEntry, n_steps: int = 7, step: float = 1.0, uniform_weights: bool = True
) -> torch.Tensor:
    """Best signed scale with ``x ≈ scale * entry``, each value on its nearest codebook entry.

    For a non-uniform ascending codebook such as IQ4_NL's, not necessarily symmetric. `x`
    is (S, n) float32. Candidates map the value of largest magnitude onto
    ``grid.entries[0] + k * step`` and onto ``grid.entries[-1] + k * step`` for
    ``k in [-n_steps, n_steps]``: both ends, since an asymmetric codebook may fit a block
    better the other way round, and a ladder around each because the error is not
    smooth in the scale. For each candidate every value is assigned its nearest entry,
    the scale is re-fitted by least squares and the fit with the largest error reduction
    ``(Σw·x·q)² / Σw·q²`` wins. The weights ``w`` are uniform by default (the plain
    squared error; on gaussian data that beats ggml's ``x²`` weighting by 3% rms for
    IQ4_NL) or ``x²`` with `uniform_weights=False`. Sub-blocks below `GROUP_MAX_EPS` get
    scale 0. Returns an (S,) float32 tensor.
    """
    index = x.abs().argmax(dim=-1, keepdim=True)
    extreme = torch.gather(x, -1, index)
    tiny = extreme.abs() < GROUP_MAX_EPS
    safe_extreme = torch.where(tiny, 1.0, extreme)
    unit = x / safe_extreme  # in [-1, 1], the extreme at exactly 1; rescaled at the end
    weights = torch.ones_like(unit) if uniform_weights else unit * unit
    buffers = _SumBuffers(x)
    scaled = torch.empty_like(x)

    best_gain = torch.full_like(extreme, -1.0)
    best_scale = torch.zeros_like(extreme)
    for end in (float(grid.entries[0]), float(grid.entries[-1])):
        for k in range(-n_steps, n_steps + 1):
            target = end + k * step
            if target == 0:
                continue
            codes = grid.values(torch.mul(unit, target, out=scaled))
            s_l2, s_xl = buffers.symmetric_sums(codes, weights, unit)
            fit = s_xl / s_l2.clamp_min(_TINY)
            gain = fit * s_xl
            better = (s_l2 > 0) & (gain > best_gain)
            best_gain = torch.where(better, gain, best_gain)
            best_scale = torch.where(better, fit, best_scale)

    scale = best_scale * extreme
    return torch.where(tiny, 0.0, scale).squeeze(1)


def refine_sub_block_scales(
    values: torch.Tensor,
    d: torch.Tensor,
    sc: torch.Tensor,
    sc_range: tuple[int, int],
    reconstruct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Re-pick each sub-block's integer scale among ``sc - 1, sc, sc + 1`` by its actual error.

    The two-level types round every sub-block's best float scale to an integer multiple
    of the super-block's ``d``; for sub-blocks much smaller than the largest, that
    integer is small and the rounding moves the scale a lot, so the nearest integer is
    often not the best one once the values are re-rounded against it. `values` is
    (B, S, n), `d` the decoded super-block scale (B, 1), `sc` the integer scales (B, S) as
    float32, `sc_range` their storable range and ``reconstruct(values, step)`` the decoded
    values for step ``d * sc`` of shape (B, S, 1). Keeps ``sc`` on ties; returns the new
    (B, S) float32 integer scales.
    """
    lo, hi = sc_range
    best_sc = sc
    best_err = _squared_error(values, reconstruct(values, (d * sc).unsqueeze(-1)))
    for delta in (-1.0, 1.0):
        candidate = (sc + delta).clamp_(lo, hi)
        err = _squared_error(values, reconstruct(values, (d * candidate).unsqueeze(-1)))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_sc = torch.where(better, candidate, best_sc)
    return best_sc


def _squared_error(values: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return (approx - values).square_().sum(-1)
