// Vocabulary shared by every part of the engine: the weight types it computes on, the
// activation formats those types are multiplied with, and views of weight matrices.
//
// Why a separate header: the ISA translation units (compiled with AVX2 or AVX-512 flags)
// and the portable orchestration code (thread pool, MoE layer, bindings) must agree on
// these definitions without sharing any inline code that depends on the ISA flags. This
// header therefore holds only plain enums, constants and POD structs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kt {

// Weight storage types, named after the GGML types whose block layout they read
// (gguf-py's quants.py is the specification of each layout).
enum class WType : int {
    F32 = 0,
    F16,
    BF16,
    Q4_0,
    Q5_0,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    Count
};

// How activations are prepared before being multiplied with a weight row.
//   Q8_32:  per 32 values, one float scale and int8 codes (what ggml calls Q8_0), used
//           with the 32-value block types Q4_0, Q5_0, Q8_0;
//   Q8_256: per 256 values, one float scale, int8 codes and the sums of each 16 codes
//           (ggml's Q8_K), used with the K-quants, whose minimums/offsets need those sums;
//   F32:    plain float32;  BF16: bfloat16 (the AVX-512 BF16 dot product's input).
enum class ActKind : int { F32 = 0, BF16, Q8_32, Q8_256, Count };

// Elementwise activation between the gate and up projections: h = act(gate) * up.
enum class ActFn : int { SiLU = 0, ReLU, GeLU, GeLUTanh, Count };

struct WTypeInfo {
    const char* name;    // GGML type name
    int block_values;    // values per block (1 for plain floats)
    int block_bytes;     // bytes per block
};

inline constexpr WTypeInfo kWTypeInfo[] = {
    {"F32", 1, 4},       {"F16", 1, 2},        {"BF16", 1, 2},
    {"Q4_0", 32, 18},    {"Q5_0", 32, 22},     {"Q8_0", 32, 34},
    {"Q4_K", 256, 144},  {"Q5_K", 256, 176},   {"Q6_K", 256, 210},
};

inline constexpr const WTypeInfo& wtype_info(WType t) { return kWTypeInfo[static_cast<int>(t)]; }

// The plain float types activations, caches and norm weights come in.
inline constexpr bool is_float_type(WType t) { return t == WType::F32 || t == WType::F16 || t == WType::BF16; }

// Bytes of one stored row of `cols` values (cols must be a whole number of blocks).
inline constexpr size_t row_bytes(WType t, int cols) {
    return static_cast<size_t>(cols / wtype_info(t).block_values) * wtype_info(t).block_bytes;
}

// Quantized activation rows keep their codes first and their per-block scalars after, each
// row padded to a cache line, so a kernel finds codes of 64 consecutive values in one load.
//   Q8_32 row:  int8 qs[n] | float d[n/32] | float dsum[n/32]   (dsum = d * sum of the codes)
//   Q8_256 row: int8 qs[n] | float d[n/256] | int16 bsums[n/16]
inline constexpr size_t align64(size_t n) { return (n + 63) & ~static_cast<size_t>(63); }

inline constexpr size_t act_row_bytes(ActKind k, int n) {
    switch (k) {
        case ActKind::F32: return align64(static_cast<size_t>(n) * 4);
        case ActKind::BF16: return align64(static_cast<size_t>(n) * 2);
        case ActKind::Q8_32: return align64(static_cast<size_t>(n) + static_cast<size_t>(n / 32) * 8);
        case ActKind::Q8_256: return align64(static_cast<size_t>(n) + static_cast<size_t>(n / 256) * 4 +
                                             static_cast<size_t>(n / 16) * 2);
        default: return 0;
    }
}

// One weight matrix of a stacked expert tensor (or a plain linear weight, with one
// "expert"): expert e's row r starts at data + e * expert_stride + r * row_stride.
struct MatrixView {
    const uint8_t* data = nullptr;
    WType type = WType::F32;
    int rows = 0;                // output features
    int cols = 0;                // input features (the contiguous, blocked dimension)
    size_t row_stride = 0;       // bytes between consecutive rows
    size_t expert_stride = 0;    // bytes between consecutive experts
    const uint8_t* row(int expert, int r) const {
        return data + static_cast<size_t>(expert) * expert_stride + static_cast<size_t>(r) * row_stride;
    }
};

}  // namespace kt
