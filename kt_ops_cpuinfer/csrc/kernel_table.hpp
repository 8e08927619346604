// The boundary between the portable engine and the ISA-specific kernels.
//
// Each instruction-set path (AVX2 baseline, AVX-512 with VNNI/BF16) is compiled in its own
// translation unit with its own compiler flags and exposes exactly one KernelTable. The
// thread pool, MoE layer and bindings are compiled for plain x86-64 and only ever call
// kernels through this table, so no AVX-512 instruction can run on a CPU that lacks it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "engine_types.hpp"

namespace kt {

// One operand pair of an attention score: query rows (float32, q_stride floats apart)
// against cached key rows (F32, F16 or BF16, key_stride bytes apart), `dim` values each.
struct AttnDotPart {
    const float* q;
    size_t q_stride;
    const uint8_t* keys;
    WType type;
    size_t key_stride;
    int dim;
};
constexpr int kAttnMaxParts = 2;  // parts one score sums (MLA: latent and rotary)

struct KernelTable {
    const char* isa;  // "avx2" or "avx512"

    // The activation format each weight type is multiplied with on this ISA.
    ActKind act_for[static_cast<int>(WType::Count)];

    // Prepare one row of n activations (n a multiple of the format's block) at dst,
    // which has act_row_bytes(kind, n) bytes.
    void (*quantize_row)(ActKind kind, const float* x, int n, uint8_t* dst);

    // out[t * out_stride + r] = <row r of w, activation row act[t]> for r < nrows, t < ntok.
    // Weight rows are w + r * w_stride, each `cols` values of type `type`; the activation
    // rows must be in act_for[type] format. Tokens are processed in small groups so that
    // each weight block is decoded once per group.
    void (*gemm)(WType type, const uint8_t* w, size_t w_stride, int nrows, int cols,
                 const uint8_t* const* act, int ntok, float* out, size_t out_stride);

    // h[i] = fn(g[i]) * u[i] for i < n.
    void (*activate)(ActFn fn, const float* g, const float* u, float* h, int n);

    // Attention over cached rows of type F32, F16 or BF16 (kernels_attention.inc):
    // out[i * out_stride + t] = sum over parts[0 .. nparts) of <q row i, key row t> for
    // i < nq, t < nkeys, nparts <= kAttnMaxParts (MLA: the latent part plus the rotary
    // part, reduced once);
    void (*dot_rows)(const AttnDotPart* parts, int nparts, int nq, int nkeys, float* out, size_t out_stride);
    // out[j * out_stride + c] += sum_t p[j * p_stride + t] * row_t[c] for j < nq, c < ncols, t < nrows.
    void (*weighted_rows)(const float* p, size_t p_stride, int nq, const uint8_t* rows, WType type, size_t row_stride,
                          int nrows, int ncols, float* out, size_t out_stride);
    // p[t] = softmax over t < n of scale * p[t], in place.
    void (*softmax_row)(float* p, int n, float scale);

    // One row of n values: RMSNorm with transformers' roundings (kernels_norm.inc); x, w and
    // out are F32, F16 or BF16, out of the promoted type of w and x.
    void (*rms_norm_row)(const uint8_t* x, WType xt, int n, const uint8_t* w, WType wt, float eps, uint8_t* out,
                         WType ot);
    // n values of a float type to float32 and back (kernels_dtype.inc).
    void (*widen_row)(const uint8_t* src, WType t, int n, float* dst);
    void (*narrow_row)(const float* src, int n, WType t, uint8_t* dst);
};

// Defined in isa_avx2.cpp / isa_avx512.cpp.
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();

}  // namespace kt
